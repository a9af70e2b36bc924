"""The limits engine in memory, on a clock the tests move: GCRA, daily budgets, headers."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from inferd.backends import create_limiter
from inferd.errors import InferdError
from inferd.tenancy import (
    Limiter,
    LimiterUnavailable,
    MemoryLimiter,
    QuotaDecision,
    Rate,
    RateDecision,
    RedisLimiter,
    parse_rate,
    rate_limit_headers,
)
from inferd.tenancy.limits import MICROS, limit_header_fields, quota_decision

START = datetime(2024, 3, 10, 12, 0, tzinfo=UTC).timestamp()  # noon: 43,200 s to midnight


class FakeClock:
    """Epoch seconds that move only when a test says so."""

    def __init__(self, now: float = START) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def limiter(clock: FakeClock) -> MemoryLimiter:
    return MemoryLimiter(clock=clock)


# --- parse_rate ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "limit", "period"),
    [
        ("50/s", 50, 1.0),
        ("600/m", 600, 60.0),
        ("1000/h", 1000, 3600.0),
        ("10000/d", 10000, 86400.0),
        (" 5 / Second ", 5, 1.0),
        ("7/minutes", 7, 60.0),
        ("100/5m", 100, 300.0),
        ("1/day", 1, 86400.0),
        ("1000000/s", 1_000_000, 1.0),
    ],
)
def test_parse_rate_reads_count_and_period(text: str, limit: int, period: float) -> None:
    assert parse_rate(text) == Rate(limit=limit, period=period)


@pytest.mark.parametrize(
    ("text", "why"),
    [
        ("", "expected '<count>/<unit>'"),
        ("50", "expected '<count>/<unit>'"),
        ("50/", "expected '<count>/<unit>'"),
        ("/s", "expected '<count>/<unit>'"),
        ("1.5/s", "expected '<count>/<unit>'"),
        ("-1/s", "expected '<count>/<unit>'"),
        ("50/s/m", "expected '<count>/<unit>'"),
        ("5/fortnight", "unknown unit 'fortnight'"),
        ("0/s", "count must be at least 1"),
        ("5/0s", "period must be at least 1 s"),
        ("2000000/s", "more than one request per microsecond"),
    ],
)
def test_parse_rate_rejects_nonsense_clearly(text: str, why: str) -> None:
    with pytest.raises(ValueError, match="invalid rate") as caught:
        parse_rate(text)
    assert why in str(caught.value)
    assert repr(text) in str(caught.value)


def test_parse_rate_rejects_a_non_string() -> None:
    with pytest.raises(ValueError, match="invalid rate"):
        parse_rate(50)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("limit", "period"), [(0, 1.0), (-1, 1.0), (True, 1.0), (1, 0.0), (1, float("inf"))]
)
def test_rate_validates_its_fields(limit: int, period: float) -> None:
    with pytest.raises(ValueError, match="rate"):
        Rate(limit=limit, period=period)


# --- GCRA -------------------------------------------------------------------------------------


async def test_burst_up_to_the_limit_then_reject_with_retry_after(
    limiter: MemoryLimiter, clock: FakeClock
) -> None:
    rate = parse_rate("5/s")  # one request every 0.2 s, five at once
    decisions = [await limiter.check_rate("k", rate) for _ in range(5)]
    assert [d.allowed for d in decisions] == [True] * 5
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0]
    assert [d.reset_after for d in decisions] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert all(d.retry_after == 0 and d.limit == 5 and not d.degraded for d in decisions)

    rejected = await limiter.check_rate("k", rate)
    assert rejected == RateDecision(
        allowed=False, limit=5, remaining=0, reset_after=1.0, retry_after=0.2, period=1.0
    )
    clock.advance(0.15)
    assert (await limiter.check_rate("k", rate)).retry_after == pytest.approx(0.05)
    clock.advance(0.05)
    allowed = await limiter.check_rate("k", rate)
    assert (allowed.allowed, allowed.remaining, allowed.reset_after) == (True, 0, 1.0)
    assert not (await limiter.check_rate("k", rate)).allowed


async def test_rejections_do_not_push_the_key_further_back(
    limiter: MemoryLimiter, clock: FakeClock
) -> None:
    rate = parse_rate("2/s")
    for _ in range(2):
        await limiter.check_rate("k", rate)
    for _ in range(100):
        assert not (await limiter.check_rate("k", rate)).allowed
    clock.advance(0.5)
    assert (await limiter.check_rate("k", rate)).allowed


async def test_steady_rate_is_always_allowed(limiter: MemoryLimiter, clock: FakeClock) -> None:
    rate = parse_rate("10/s")
    for n in range(300):
        clock.now = START + n * 0.1  # not accumulated: float sums drift by microseconds
        decision = await limiter.check_rate("k", rate)
        assert decision.allowed
        assert decision.remaining == 9  # each interval gives back the one request taken


async def test_faster_than_the_rate_gets_the_burst_plus_the_refill(
    limiter: MemoryLimiter, clock: FakeClock
) -> None:
    rate = parse_rate("10/s")
    allowed = 0
    for n in range(200):  # one every 50 ms for 10 s: twice the rate
        clock.now = START + n * 0.05
        allowed += (await limiter.check_rate("k", rate)).allowed
    # 10 at once, then one per 100 ms over the 9.95 s that follow the first request.
    assert allowed == 10 + 99


async def test_reset_after_counts_down_while_the_key_rests(
    limiter: MemoryLimiter, clock: FakeClock
) -> None:
    rate = parse_rate("600/m")  # one every 0.1 s, a burst of 600
    for _ in range(600):
        await limiter.check_rate("k", rate)
    clock.advance(30)
    decision = await limiter.check_rate("k", rate)
    assert decision.allowed
    assert decision.reset_after == pytest.approx(30.1)  # 60 s of debt, 30 s rested, +0.1 s
    assert decision.remaining == 299  # 300 requests' worth rested back, this one taken
    clock.advance(60)
    rested = await limiter.check_rate("k", rate)
    assert rested.remaining == 599
    assert rested.reset_after == pytest.approx(0.1)


async def test_keys_are_limited_apart(limiter: MemoryLimiter) -> None:
    rate = parse_rate("1/m")
    assert (await limiter.check_rate("a", rate)).allowed
    assert not (await limiter.check_rate("a", rate)).allowed
    assert (await limiter.check_rate("b", rate)).allowed


async def test_a_clock_that_steps_back_does_not_give_requests_away(
    limiter: MemoryLimiter, clock: FakeClock
) -> None:
    rate = parse_rate("1/s")
    assert (await limiter.check_rate("k", rate)).allowed
    clock.advance(-5)
    decision = await limiter.check_rate("k", rate)
    assert not decision.allowed
    assert decision.retry_after == pytest.approx(6.0)


# --- bounded memory -----------------------------------------------------------------------------


async def test_memory_is_bounded_by_max_keys(clock: FakeClock) -> None:
    limiter = MemoryLimiter(clock=clock, max_keys=100)
    for n in range(1000):
        await limiter.check_rate(f"key-{n}", parse_rate("5/h"))
        await limiter.reserve(f"key-{n}", 1000, 10)
    assert len(limiter) == 200  # 100 rate states and 100 day-usage records


async def test_least_recently_used_key_goes_first(clock: FakeClock) -> None:
    limiter = MemoryLimiter(clock=clock, max_keys=2)
    rate = parse_rate("1/h")
    await limiter.check_rate("a", rate)
    await limiter.check_rate("b", rate)
    assert not (await limiter.check_rate("a", rate)).allowed  # "a" is now the recent one
    await limiter.check_rate("c", rate)  # evicts "b"
    assert not (await limiter.check_rate("a", rate)).allowed
    assert (await limiter.check_rate("b", rate)).allowed  # forgotten: a full bucket again


async def test_idle_keys_are_swept_without_losing_anything(clock: FakeClock) -> None:
    limiter = MemoryLimiter(clock=clock, sweep_interval=10)
    for n in range(50):
        await limiter.check_rate(f"key-{n}", parse_rate("2/m"))  # full again after 30 s
        await limiter.reserve(f"key-{n}", 100, 1)
    assert len(limiter) == 100
    clock.advance(31)
    await limiter.check_rate("other", parse_rate("2/m"))
    assert len(limiter) == 51  # the full buckets went; today's usage stays
    clock.advance(2 * 86400)
    await limiter.usage("other")
    assert len(limiter) == 0  # usage older than yesterday went too


# --- daily token budget -------------------------------------------------------------------------


async def test_reserve_takes_tokens_while_they_fit(limiter: MemoryLimiter) -> None:
    first = await limiter.reserve("k", budget=1000, tokens=600)
    assert first == QuotaDecision(
        allowed=True,
        limit=1000,
        remaining=400,
        reset_at=datetime(2024, 3, 11, tzinfo=UTC),
        retry_after=0.0,
        day="2024-03-10",
        reserved=600,
        reset_after=43200.0,
    )
    assert (await limiter.reserve("k", 1000, 400)).remaining == 0  # exactly the budget fits
    rejected = await limiter.reserve("k", 1000, 1)
    assert (rejected.allowed, rejected.remaining, rejected.reserved) == (False, 0, 0)
    assert rejected.retry_after == rejected.reset_after == 43200.0
    assert await limiter.usage("k") == ("2024-03-10", 1000)


async def test_a_rejected_reservation_takes_nothing(limiter: MemoryLimiter) -> None:
    await limiter.reserve("k", 100, 70)
    rejected = await limiter.reserve("k", 100, 31)
    assert not rejected.allowed and rejected.remaining == 30
    assert (await limiter.reserve("k", 100, 30)).allowed
    assert not (await limiter.reserve("k", 100, 101)).allowed  # more than the whole budget


async def test_settle_gives_back_or_charges_the_difference(limiter: MemoryLimiter) -> None:
    decision = await limiter.reserve("k", 1000, 500)
    await limiter.settle("k", decision.reserved, 120, day=decision.day)
    assert await limiter.usage("k") == ("2024-03-10", 120)
    decision = await limiter.reserve("k", 1000, 100)
    await limiter.settle("k", decision.reserved, 300)  # used more than it reserved
    assert await limiter.usage("k") == ("2024-03-10", 420)
    assert (await limiter.reserve("k", 1000, 580)).allowed
    assert not (await limiter.reserve("k", 1000, 1)).allowed


async def test_settle_never_takes_usage_below_zero(limiter: MemoryLimiter) -> None:
    await limiter.reserve("k", 1000, 50)
    await limiter.settle("k", reserved=500, actual=0)
    assert await limiter.usage("k") == ("2024-03-10", 0)
    await limiter.settle("fresh", reserved=10, actual=0)
    assert await limiter.usage("fresh") == ("2024-03-10", 0)
    await limiter.settle("fresh", reserved=0, actual=7)  # unreserved use is still counted
    assert await limiter.usage("fresh") == ("2024-03-10", 7)


async def test_the_budget_renews_at_utc_midnight(limiter: MemoryLimiter, clock: FakeClock) -> None:
    clock.now = datetime(2024, 3, 10, 23, 59, 59, tzinfo=UTC).timestamp()
    late = await limiter.reserve("k", 100, 90)
    assert late.reset_after == 1.0
    assert not (await limiter.reserve("k", 100, 50)).allowed
    clock.advance(1)
    early = await limiter.reserve("k", 100, 50)
    assert early.allowed
    assert (early.day, early.remaining) == ("2024-03-11", 50)
    assert early.reset_at == datetime(2024, 3, 12, tzinfo=UTC)
    assert early.reset_after == 86400.0

    # The request reserved before midnight settles on its own day, not on today's budget.
    await limiter.settle("k", late.reserved, 10, day=late.day)
    assert await limiter.usage("k", day="2024-03-10") == ("2024-03-10", 10)
    assert await limiter.usage("k") == ("2024-03-11", 50)


async def test_usage_older_than_yesterday_is_gone(limiter: MemoryLimiter, clock: FakeClock) -> None:
    decision = await limiter.reserve("k", 100, 40)
    clock.advance(86400)
    assert await limiter.usage("k", day=decision.day) == ("2024-03-10", 40)  # yesterday
    clock.advance(86400)
    await limiter.settle("k", decision.reserved, 100, day=decision.day)
    assert await limiter.usage("k", day=decision.day) == ("2024-03-10", 0)
    assert await limiter.usage("k") == ("2024-03-12", 0)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "3"])
async def test_token_counts_must_be_whole_and_not_negative(
    limiter: MemoryLimiter, bad: object
) -> None:
    with pytest.raises(ValueError, match="tokens must be a whole number"):
        await limiter.reserve("k", 100, bad)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="budget must be a whole number"):
        await limiter.reserve("k", bad, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="actual must be a whole number"):
        await limiter.settle("k", 1, bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("day", ["yesterday", "2024-13-01", "2024-3-1", "20240301"])
async def test_a_day_must_be_an_iso_date(limiter: MemoryLimiter, day: str) -> None:
    with pytest.raises(ValueError, match="expected 'YYYY-MM-DD'"):
        await limiter.usage("k", day=day)
    with pytest.raises(ValueError, match="expected 'YYYY-MM-DD'"):
        await limiter.settle("k", 1, 2, day=day)


# --- headers ------------------------------------------------------------------------------------


async def test_headers_of_an_allowed_request(limiter: MemoryLimiter) -> None:
    decision = await limiter.check_rate("k", parse_rate("50/s"))
    assert rate_limit_headers(decision) == {
        "ratelimit-policy": '"rate";q=50;w=1',
        "ratelimit": '"rate";r=49;t=1',
    }


async def test_headers_of_a_rejected_request(limiter: MemoryLimiter) -> None:
    rate = parse_rate("600/m")
    for _ in range(600):
        await limiter.check_rate("k", rate)
    rejected = await limiter.check_rate("k", rate)
    assert (rejected.reset_after, rejected.retry_after) == (60.0, 0.1)
    # t names the moment quota is back, the same as Retry-After (never before it).
    assert rate_limit_headers(rejected) == {
        "ratelimit-policy": '"rate";q=600;w=60',
        "ratelimit": '"rate";r=0;t=1',
        "retry-after": "1",
    }


async def test_rate_and_quota_share_one_field_each(
    limiter: MemoryLimiter, clock: FakeClock
) -> None:
    rate = await limiter.check_rate("k", parse_rate("50/s"))
    quota = await limiter.reserve("k", 100_000, 1000)
    assert rate_limit_headers(rate, quota) == {
        "ratelimit-policy": '"rate";q=50;w=1, "daily";q=100000;w=86400',
        "ratelimit": '"rate";r=49;t=1, "daily";r=99000;t=43200',
    }
    clock.advance(0.25)
    over = await limiter.reserve("k", 100_000, 99_001)
    assert rate_limit_headers(rate, over) == {
        "ratelimit-policy": '"rate";q=50;w=1, "daily";q=100000;w=86400',
        "ratelimit": '"rate";r=49;t=1, "daily";r=99000;t=43200',
        "retry-after": "43200",
    }


async def test_retry_after_is_the_latest_of_the_rejections(limiter: MemoryLimiter) -> None:
    rate = parse_rate("1/m")
    await limiter.check_rate("k", rate)
    rejected_rate = await limiter.check_rate("k", rate)
    await limiter.reserve("k", 10, 10)
    rejected_quota = await limiter.reserve("k", 10, 1)
    headers = rate_limit_headers(rejected_quota, rejected_rate)
    assert headers["retry-after"] == "43200"
    assert headers["ratelimit"] == '"daily";r=0;t=43200, "rate";r=0;t=60'


def test_headers_leave_out_missing_and_degraded_decisions() -> None:
    degraded = RateDecision(True, 50, 50, 0.0, 0.0, period=1.0, degraded=True)
    assert rate_limit_headers() == {}
    assert rate_limit_headers(None, degraded) == {}


def test_headers_refuse_two_decisions_of_one_policy() -> None:
    decision = RateDecision(True, 50, 49, 0.02, 0.0, period=1.0)
    with pytest.raises(ValueError, match="more than one RateDecision"):
        rate_limit_headers(decision, decision)


def test_headers_round_seconds_up() -> None:
    decision = RateDecision(False, 3, 0, 2.5, 0.0000001, period=7200.0)
    assert rate_limit_headers(decision) == {
        "ratelimit-policy": '"rate";q=3;w=7200',
        "ratelimit": '"rate";r=0;t=1',
        "retry-after": "1",
    }
    exact = RateDecision(True, 3, 1, 2.0000000001, 0.0, period=3.0)
    assert rate_limit_headers(exact)["ratelimit"] == '"rate";r=1;t=2'


# --- construction and errors --------------------------------------------------------------------


async def test_create_limiter_picks_the_backend(clock: FakeClock) -> None:
    memory = create_limiter(None, fail_open=False, clock=clock)
    assert isinstance(memory, MemoryLimiter)
    assert isinstance(memory, Limiter)
    shared = create_limiter("redis://127.0.0.1:1/0", fail_open=True, clock=clock)
    assert isinstance(shared, RedisLimiter)  # connects lazily: nothing is reached here
    assert isinstance(shared, Limiter)
    await shared.close()


def test_limiter_unavailable_is_a_retryable_503() -> None:
    error = LimiterUnavailable("down", retry_after=1)
    assert isinstance(error, InferdError)
    assert (error.status_code, error.code, error.retryable) == (503, "limiter_unavailable", True)
    assert error.headers() == {"retry-after": "1"}


@pytest.mark.parametrize(
    ("rate", "quota"),
    [
        (RateDecision(True, 50, 49, 0.02, 0.0, period=1.0), None),
        (None, quota_decision(True, 1000, 10, 10, 1_700_000_000 * MICROS)),
        (
            RateDecision(True, 3, 2, 20.0000001, 0.0, period=60.0),
            quota_decision(True, 5, 3, 3, 1_700_000_000 * MICROS + 1),
        ),
        (RateDecision(False, 3, 0, 2.5, 1.2, period=60.0), None),
        (
            RateDecision(True, 3, 2, 20.0, 0.0, period=60.0),
            quota_decision(False, 5, 4, 3, 1_700_000_000 * MICROS),
        ),
        (RateDecision(True, 50, 50, 0.0, 0.0, period=1.0, degraded=True), None),
        (None, None),
    ],
)
def test_hot_path_header_fields_equal_the_reference_rendering(
    rate: RateDecision | None, quota: QuotaDecision | None
) -> None:
    expected = [(k.encode(), v.encode()) for k, v in rate_limit_headers(rate, quota).items()]
    assert limit_header_fields(rate, quota) == expected
    assert limit_header_fields(rate, quota) == expected  # the cached policy field is the same
