"""The limits engine against a real Redis on loopback, as several API processes would share it.

The contract tests run over both backends, so the Lua scripts are held to the memory backend's
decisions. Each test works under its own key prefix and deletes it afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime

import pytest
import redis
import redis.asyncio

from inferd.backends import create_limiter
from inferd.tenancy import (
    Limiter,
    LimiterUnavailable,
    MemoryLimiter,
    RedisLimiter,
    parse_rate,
)
from tests.unit.test_limits import START, FakeClock

REDIS_URL = "redis://127.0.0.1:6379/0"
LOGGER = "inferd.tenancy.limits"


@pytest.fixture(scope="module")
def redis_url() -> str:
    """Redis on loopback: skipped where unreachable, unless INFERD_TEST_REQUIRE_SERVICES=1."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1).ping()
    except (redis.RedisError, OSError) as exc:
        if os.environ.get("INFERD_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail(f"Redis is required for this test: {exc!r}")
        pytest.skip(f"Redis is not reachable: {exc!r}")
    return REDIS_URL


@pytest.fixture
def prefix(redis_url: str) -> Iterator[str]:
    """A key prefix of this test's own; its keys are deleted afterwards."""
    name = f"inferd:test-limits:{uuid.uuid4().hex}:"
    yield name
    with redis.Redis.from_url(redis_url) as client:
        keys = list(client.scan_iter(match=f"{name}*"))
        if keys:
            client.delete(*keys)


@contextlib.asynccontextmanager
async def redis_limiters(
    url: str, prefix: str, n: int, clock: FakeClock, **options: float
) -> AsyncIterator[list[RedisLimiter]]:
    """``n`` limiters, each with its own connection pool, as ``n`` API processes hold them."""
    opened = [
        RedisLimiter(url, prefix=prefix, fail_open=False, clock=clock, **options)  # type: ignore[arg-type]
        for _ in range(n)
    ]
    try:
        yield opened
    finally:
        for limiter in opened:
            await limiter.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# --- the contract, over both backends -----------------------------------------------------------


@pytest.fixture(params=["memory", "redis"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[tuple[Limiter, FakeClock]]:
    clock = FakeClock()
    if request.param == "memory":
        yield MemoryLimiter(clock=clock), clock
        return
    url = request.getfixturevalue("redis_url")
    prefix = request.getfixturevalue("prefix")
    async with redis_limiters(url, prefix, 1, clock) as (limiter,):
        yield limiter, clock


async def test_contract_burst_then_reject(backend: tuple[Limiter, FakeClock]) -> None:
    limiter, clock = backend
    rate = parse_rate("5/m")  # one every 12 s
    decisions = [await limiter.check_rate("k", rate) for _ in range(5)]
    assert [d.remaining for d in decisions] == [4, 3, 2, 1, 0]
    assert [d.reset_after for d in decisions] == [12.0, 24.0, 36.0, 48.0, 60.0]
    rejected = await limiter.check_rate("k", rate)
    assert (rejected.allowed, rejected.remaining) == (False, 0)
    assert (rejected.reset_after, rejected.retry_after) == (60.0, 12.0)
    clock.advance(11.5)
    assert (await limiter.check_rate("k", rate)).retry_after == 0.5
    clock.advance(0.5)
    assert (await limiter.check_rate("k", rate)).allowed
    assert (await limiter.check_rate("other", rate)).remaining == 4  # keys are apart


async def test_contract_steady_rate(backend: tuple[Limiter, FakeClock]) -> None:
    limiter, clock = backend
    rate = parse_rate("60/m")
    for n in range(50):
        clock.now = START + n
        decision = await limiter.check_rate("k", rate)
        assert (decision.allowed, decision.remaining, decision.reset_after) == (True, 59, 1.0)


async def test_contract_daily_budget(backend: tuple[Limiter, FakeClock]) -> None:
    limiter, clock = backend
    first = await limiter.reserve("k", 1000, 700)
    assert (first.allowed, first.remaining, first.day, first.reserved) == (
        True,
        300,
        "2024-03-10",
        700,
    )
    assert first.reset_at == datetime(2024, 3, 11, tzinfo=UTC)
    rejected = await limiter.reserve("k", 1000, 301)
    assert (rejected.allowed, rejected.remaining, rejected.retry_after) == (False, 300, 43200)
    await limiter.settle("k", first.reserved, 200, day=first.day)
    assert await limiter.usage("k") == ("2024-03-10", 200)
    await limiter.settle("k", 1000, 0)
    assert await limiter.usage("k") == ("2024-03-10", 0)

    late = await limiter.reserve("k", 1000, 900)
    clock.now = datetime(2024, 3, 11, 0, 0, 1, tzinfo=UTC).timestamp()
    assert (await limiter.reserve("k", 1000, 1000)).allowed  # a new day, a full budget
    await limiter.settle("k", late.reserved, 950, day=late.day)
    assert await limiter.usage("k", day="2024-03-10") == ("2024-03-10", 950)
    assert await limiter.usage("k") == ("2024-03-11", 1000)
    clock.advance(86400)
    await limiter.settle("k", late.reserved, 0, day=late.day)  # two days on: gone
    assert await limiter.usage("k", day="2024-03-10") == ("2024-03-10", 0)


async def test_redis_decides_exactly_as_memory(redis_url: str, prefix: str) -> None:
    memory_clock, redis_clock = FakeClock(), FakeClock()
    memory = MemoryLimiter(clock=memory_clock)
    rates = [parse_rate(text) for text in ("3/s", "7/m", "100/h", "1/5m")]
    steps = [0.0, 0.05, 0.3, 1.7, 0.0, 12.5, 0.001, 299.9, 3.3]
    async with redis_limiters(redis_url, prefix, 1, redis_clock) as (shared,):
        for n in range(300):
            step, rate, key = steps[n % len(steps)], rates[n % len(rates)], f"k{n % 5}"
            memory_clock.advance(step)
            redis_clock.advance(step)
            assert await shared.check_rate(key, rate) == await memory.check_rate(key, rate)
            tokens = (n * 37) % 500
            assert await shared.reserve(key, 5000, tokens) == await memory.reserve(
                key, 5000, tokens
            )
            if n % 3 == 0:
                await shared.settle(key, tokens, tokens // 2)
                await memory.settle(key, tokens, tokens // 2)
            assert await shared.usage(key) == await memory.usage(key)


# --- Redis specifics ----------------------------------------------------------------------------


async def test_concurrent_checks_from_three_processes_allow_exactly_the_limit(
    redis_url: str, prefix: str
) -> None:
    rate = parse_rate("100/m")
    async with redis_limiters(redis_url, prefix, 3, FakeClock(), timeout=5) as apis:
        decisions = await asyncio.gather(
            *(apis[n % 3].check_rate("hot", rate) for n in range(1000))
        )
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 100
    assert sorted(d.remaining for d in allowed) == list(range(100))  # each slot handed out once


async def test_concurrent_reservations_never_exceed_the_budget(redis_url: str, prefix: str) -> None:
    async with redis_limiters(redis_url, prefix, 3, FakeClock(), timeout=5) as apis:
        decisions = await asyncio.gather(*(apis[n % 3].reserve("hot", 1000, 7) for n in range(300)))
        assert sum(d.allowed for d in decisions) == 1000 // 7
        assert await apis[0].usage("hot") == ("2024-03-10", 1000 // 7 * 7)


async def test_keys_expire_when_nothing_is_left_to_remember(redis_url: str, prefix: str) -> None:
    clock = FakeClock()
    async with redis_limiters(redis_url, prefix, 1, clock) as (shared,):
        for _ in range(3):
            await shared.check_rate("k", parse_rate("10/m"))
        await shared.reserve("k", 100, 1)
    client = redis.asyncio.Redis.from_url(redis_url)
    try:
        assert 17_000 < await client.pttl(f"{prefix}rate:k") <= 18_000  # full in 18 s
        ttl = await client.pttl(f"{prefix}quota:k:2024-03-10")
        assert 129_600_000 - 1000 < ttl <= 129_600_000  # to the end of the next day
    finally:
        await client.aclose()


async def test_create_limiter_shares_state_through_redis(redis_url: str, prefix: str) -> None:
    clock = FakeClock()
    first = create_limiter(redis_url, fail_open=False, clock=clock)
    second = create_limiter(redis_url, fail_open=False, clock=clock)
    key = prefix  # under the default prefix: a key id of this test's own
    try:
        assert (await first.check_rate(key, parse_rate("1/h"))).allowed
        assert not (await second.check_rate(key, parse_rate("1/h"))).allowed
    finally:
        await first.close()
        await second.close()
        client = redis.asyncio.Redis.from_url(redis_url)
        await client.delete(f"inferd:limits:rate:{key}")
        await client.aclose()


# --- outages ------------------------------------------------------------------------------------


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelname == "WARNING"]


async def test_fail_open_allows_and_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    limiter = RedisLimiter(f"redis://127.0.0.1:{free_port()}/0", fail_open=True)
    try:
        for _ in range(20):
            decision = await limiter.check_rate("k", parse_rate("1/h"))
            assert decision.allowed and decision.degraded
        quota = await limiter.reserve("k", 10, 100)
        assert (quota.allowed, quota.degraded, quota.reserved) == (True, True, 0)
        await limiter.settle("k", quota.reserved, 100, day=quota.day)  # dropped, not raised
        with pytest.raises(LimiterUnavailable):
            await limiter.usage("k")  # no safe guess at a number
    finally:
        await limiter.close()
    assert limiter.failures == 22
    [warning] = warnings_of(caplog)
    assert "Redis unavailable, allowing requests unchecked" in warning


async def test_fail_closed_raises_limiter_unavailable(caplog: pytest.LogCaptureFixture) -> None:
    limiter = RedisLimiter(f"redis://127.0.0.1:{free_port()}/0", fail_open=False)
    calls: list[Callable[[], Awaitable[object]]] = [
        lambda: limiter.check_rate("k", parse_rate("1/h")),
        lambda: limiter.reserve("k", 10, 1),
        lambda: limiter.settle("k", 1, 2),
    ]
    try:
        for call in calls * 3:
            with pytest.raises(LimiterUnavailable) as caught:
                await call()
            assert (caught.value.status_code, caught.value.code) == (503, "limiter_unavailable")
            assert caught.value.headers() == {"retry-after": "1"}
    finally:
        await limiter.close()
    [warning] = warnings_of(caplog)
    assert "rejecting requests" in warning


async def test_a_silent_redis_costs_at_most_the_timeout() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # read nothing, answer nothing: a hung server

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    limiter = RedisLimiter(f"redis://127.0.0.1:{port}/0", fail_open=True, timeout=0.1)
    loop = asyncio.get_running_loop()
    try:
        started = loop.time()
        assert (await limiter.check_rate("k", parse_rate("1/h"))).degraded
        assert loop.time() - started < 0.5
        started = loop.time()
        for _ in range(100):  # within recheck_interval: Redis is not waited on again
            assert (await limiter.check_rate("k", parse_rate("1/h"))).degraded
        assert loop.time() - started < 0.1
    finally:
        await limiter.close()
        server.close()
        for writer in accepted:
            writer.close()


async def test_limits_resume_when_redis_comes_back(
    redis_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    port = free_port()
    tasks: set[asyncio.Task[None]] = set()

    async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await src.read(65536):
                dst.write(data)
                await dst.drain()
        dst.close()

    async def forward(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 6379)
        for task in (pipe(reader, up_writer), pipe(up_reader, writer)):
            tasks.add(asyncio.create_task(task))

    url = f"redis://127.0.0.1:{port}/0"
    limiter = RedisLimiter(url, prefix=prefix, fail_open=True, recheck_interval=0.05)
    rate = parse_rate("1/h")
    server: asyncio.Server | None = None
    try:
        assert (await limiter.check_rate("k", rate)).degraded  # nothing listens yet
        server = await asyncio.start_server(forward, "127.0.0.1", port)
        assert (await limiter.check_rate("k", rate)).degraded  # not retried so soon
        await asyncio.sleep(0.06)
        first = await limiter.check_rate("k", rate)
        assert first.allowed and not first.degraded
        assert not (await limiter.check_rate("k", rate)).allowed
    finally:
        await limiter.close()
        if server is not None:
            server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    messages = [r.getMessage() for r in caplog.records if r.name == LOGGER]
    assert len(messages) == 2
    assert "Redis unavailable" in messages[0]
    assert messages[1] == "limits: Redis available again"
