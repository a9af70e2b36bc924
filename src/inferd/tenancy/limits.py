"""Per-API-key limits: a request rate and a daily token budget.

Request rate
    GCRA (the generic cell rate algorithm, a token bucket kept as one timestamp): a key with
    :class:`Rate` ``limit/period`` may send ``limit`` requests at once (the burst equals the
    limit) and then one every ``period / limit`` seconds. The state of a key is its theoretical
    arrival time (TAT); a key whose TAT has passed holds a full bucket, so it needs no state.
    Times are whole microseconds so that the memory and the Redis backends (Lua numbers are
    doubles, exact for integers below 2**53) decide alike, without float drift at the edge of a
    burst.

Daily token budget
    :meth:`Limiter.reserve` takes tokens out of the key's budget for the current UTC day before a
    request runs, if they fit; :meth:`Limiter.settle` corrects the day's usage by what the
    request really used. Usage is kept per key and day and is forgotten two days later.

Clock
    Every backend reads time from an injectable ``clock`` (epoch seconds), never from Redis: the
    same clock then drives tests, and one backend's decisions can be replayed on another. The
    price, with Redis, is that every API process's clock writes the shared state, so their clocks
    must be NTP-synced: a process whose clock runs ahead by ``d`` makes the key look ``d``
    seconds more rested to itself, and one that lags sees it more loaded.

This module holds what both backends share (the types, GCRA, the day arithmetic);
:class:`~inferd.tenancy.limits_memory.MemoryLimiter` serves one process,
:class:`~inferd.tenancy.limits_redis.RedisLimiter` several (:func:`inferd.backends.create_limiter`
picks one). :func:`rate_limit_headers`
renders decisions as the ``RateLimit-Policy``/``RateLimit`` fields of
draft-ietf-httpapi-ratelimit-headers, with ``Retry-After`` on rejection.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Protocol, runtime_checkable

from inferd.errors import InferdError

__all__ = [
    "Clock",
    "Limiter",
    "LimiterUnavailable",
    "QuotaDecision",
    "Rate",
    "RateDecision",
    "limit_header_fields",
    "parse_rate",
    "rate_limit_headers",
]

Clock = Callable[[], float]
"""Current time in epoch seconds (``time.time``)."""

MICROS = 1_000_000
DAY_SECONDS = 86_400
DAY_MICROS = DAY_SECONDS * MICROS
_EPOCH_ORDINAL = date(1970, 1, 1).toordinal()

_UNITS = {
    "s": 1,
    "sec": 1,
    "second": 1,
    "seconds": 1,
    "m": 60,
    "min": 60,
    "minute": 60,
    "minutes": 60,
    "h": 3600,
    "hour": 3600,
    "hours": 3600,
    "d": DAY_SECONDS,
    "day": DAY_SECONDS,
    "days": DAY_SECONDS,
}
_RATE = re.compile(r"\s*(\d+)\s*/\s*(\d+)?\s*([A-Za-z]+)\s*")


class LimiterUnavailable(InferdError):
    """The limits store could not be reached and the limiter is set to fail closed."""

    status_code = 503
    code = "limiter_unavailable"
    retryable = True


@dataclass(frozen=True, slots=True)
class Rate:
    """``limit`` requests per ``period`` seconds, with a burst of ``limit``."""

    limit: int
    period: float
    interval_us: int = field(init=False, compare=False, repr=False)
    """Spacing between requests at the sustained rate, in whole microseconds."""

    def __post_init__(self) -> None:
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or self.limit < 1:
            raise ValueError(f"rate limit must be a whole number >= 1, not {self.limit!r}")
        if not (isinstance(self.period, int | float) and math.isfinite(self.period)) or (
            self.period <= 0
        ):
            raise ValueError(f"rate period must be a positive number of seconds: {self.period!r}")
        if self.period * MICROS / self.limit < 1:
            # Times are whole microseconds: a finer spacing would round to zero.
            raise ValueError(
                f"rate {self.limit} per {self.period:g} s is more than one request per microsecond"
            )
        object.__setattr__(self, "interval_us", max(1, round(self.period * MICROS / self.limit)))


def parse_rate(text: str) -> Rate:
    """Read ``"<count>/<unit>"`` (``"50/s"``, ``"600/m"``, ``"1000/h"``, ``"10000/d"``) or
    ``"<count>/<n><unit>"`` (``"100/5m"``). Units: s, m, h, d (or sec/second, min/minute, hour,
    day, with plurals). Raises :class:`ValueError` saying what is wrong."""
    expected = "expected '<count>/<unit>' such as '50/s' or '600/m' (units: s, m, h, d)"
    if not isinstance(text, str):
        raise ValueError(f"invalid rate {text!r}: {expected}")
    match = _RATE.fullmatch(text)
    if match is None:
        raise ValueError(f"invalid rate {text!r}: {expected}")
    count, multiple, unit = match.groups()
    seconds = _UNITS.get(unit.lower())
    if seconds is None:
        raise ValueError(f"invalid rate {text!r}: unknown unit {unit!r}; {expected}")
    if int(count) < 1:
        raise ValueError(f"invalid rate {text!r}: the count must be at least 1")
    if multiple is not None and int(multiple) < 1:
        raise ValueError(f"invalid rate {text!r}: the period must be at least 1 {unit}")
    try:
        return Rate(limit=int(count), period=float(seconds * int(multiple or 1)))
    except ValueError as exc:
        raise ValueError(f"invalid rate {text!r}: {exc}") from None


@dataclass(slots=True)
class RateDecision:
    """The answer to one :meth:`Limiter.check_rate`.

    ``remaining``: requests that could follow at once. ``reset_after``: seconds until the bucket
    is full again. ``retry_after``: seconds until the next request would be allowed (0 when this
    one was). ``degraded``: the store was unreachable and the request was let through unchecked;
    the other numbers then mean nothing.
    """

    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    retry_after: float
    period: float
    degraded: bool = False


@dataclass(slots=True)
class QuotaDecision:
    """The answer to one :meth:`Limiter.reserve`.

    ``remaining``: tokens left in the day's budget after this reservation. ``reset_at``: the
    next UTC midnight, when the budget renews; ``reset_after``: seconds until then;
    ``retry_after``: the same on rejection, 0 when allowed. ``day``: the UTC day (``YYYY-MM-DD``)
    the tokens were taken from. ``reserved``: tokens actually taken (0 on rejection or when
    degraded): pass it and ``day`` to :meth:`Limiter.settle`. ``degraded``: the store was
    unreachable and the request was let through unchecked.
    """

    allowed: bool
    limit: int
    remaining: int
    reset_at: datetime
    retry_after: float
    day: str
    reserved: int
    reset_after: float
    degraded: bool = False


@runtime_checkable
class Limiter(Protocol):
    """Per-key request rate and daily token budget; see the module docstring."""

    async def check_rate(self, key_id: str, rate: Rate) -> RateDecision:
        """Count one request of ``key_id`` against ``rate`` if it is allowed."""
        ...

    async def reserve(self, key_id: str, budget: int, tokens: int) -> QuotaDecision:
        """Take ``tokens`` from today's ``budget`` of ``key_id`` if they fit, atomically."""
        ...

    async def settle(
        self, key_id: str, reserved: int, actual: int, *, day: str | None = None
    ) -> None:
        """Add ``actual - reserved`` to the usage of ``day`` (default today), never below 0."""
        ...

    async def usage(self, key_id: str, *, day: str | None = None) -> tuple[str, int]:
        """``(day, tokens used)`` of ``key_id`` on ``day`` (default: the current UTC day); 0
        for days before yesterday, which are no longer kept."""
        ...

    async def close(self) -> None:
        """Release connections; the limiter is not used afterwards."""
        ...


# --- arithmetic shared by the backends (the Lua scripts mirror it line by line) ---------------


def now_micros(clock: Clock) -> int:
    """``clock()`` in whole microseconds."""
    return round(clock() * MICROS)


def gcra(tat: int, now: int, interval: int, limit: int) -> tuple[bool, int, int, int, int]:
    """One GCRA step: ``(allowed, new_tat, remaining, reset_after, retry_after)``, all times in
    microseconds. ``new_tat`` is what to store when allowed (``tat`` is unchanged otherwise)."""
    window = interval * limit
    tat = max(tat, now)  # an idle key's TAT lies in the past: its bucket is full
    new_tat = tat + interval
    if new_tat - now > window:
        return False, tat, 0, tat - now, new_tat - window - now
    return True, new_tat, (window - (new_tat - now)) // interval, new_tat - now, 0


def day_of(now_us: int) -> tuple[int, str]:
    """``(days since the epoch, "YYYY-MM-DD")`` of the UTC day holding ``now_us``.

    POSIX time has no leap seconds, so every UTC day is exactly 86,400 epoch seconds."""
    index = now_us // DAY_MICROS
    return index, _day(index)[0]


@functools.lru_cache(maxsize=16)
def _day(index: int) -> tuple[str, datetime]:
    """``("YYYY-MM-DD", next UTC midnight)`` of day ``index``; cached, as every decision of a
    day asks for the same two values."""
    return (
        date.fromordinal(_EPOCH_ORDINAL + index).isoformat(),
        datetime.fromtimestamp((index + 1) * DAY_SECONDS, UTC),
    )


def day_index(day: str) -> int:
    """Days since the epoch of ``"YYYY-MM-DD"``; :class:`ValueError` if it is not one."""
    try:
        if not isinstance(day, str) or len(day) != 10:
            raise ValueError(day)
        return date.fromisoformat(day).toordinal() - _EPOCH_ORDINAL
    except ValueError:
        raise ValueError(f"invalid day {day!r}: expected 'YYYY-MM-DD'") from None


def usage_ttl_us(index: int, now_us: int) -> int:
    """How long the usage of day ``index`` is kept from ``now_us``: to the end of the next day,
    so that late settlements and yesterday's usage still find it."""
    return (index + 2) * DAY_MICROS - now_us


def check_count(name: str, value: int) -> None:
    """Token counts and budgets are whole numbers >= 0."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be a whole number >= 0, not {value!r}")


def rate_decision(rate: Rate, step: tuple[bool, int, int, int, int]) -> RateDecision:
    """The decision of a :func:`gcra` step."""
    allowed, _, remaining, reset_after, retry_after = step
    return RateDecision(
        allowed, rate.limit, remaining, reset_after / MICROS, retry_after / MICROS, rate.period
    )


def degraded_rate(rate: Rate) -> RateDecision:
    """The decision made when the store is unreachable and the limiter fails open."""
    return RateDecision(
        allowed=True,
        limit=rate.limit,
        remaining=rate.limit,
        reset_after=0.0,
        retry_after=0.0,
        period=rate.period,
        degraded=True,
    )


def quota_decision(
    allowed: bool, budget: int, used: int, tokens: int, now_us: int, *, degraded: bool = False
) -> QuotaDecision:
    """The decision of a reservation of ``tokens`` that left the day's usage at ``used``."""
    index = now_us // DAY_MICROS
    day, reset_at = _day(index)
    reset_after = ((index + 1) * DAY_MICROS - now_us) / MICROS
    return QuotaDecision(
        allowed,
        budget,
        max(0, budget - used),
        reset_at,
        0.0 if allowed else reset_after,
        day,
        tokens if allowed and not degraded else 0,
        reset_after,
        degraded,
    )


# --- HTTP header fields -------------------------------------------------------------------------


def _ceil_seconds(seconds: float) -> int:
    # Round to the microsecond first: 2.0000000001 s of float noise is 2 s, not 3.
    return max(0, math.ceil(round(seconds, 6)))


def rate_limit_headers(*decisions: RateDecision | QuotaDecision | None) -> dict[str, str]:
    """Response header fields for the decisions of one request (draft-ietf-httpapi-ratelimit-
    headers, structured-field form): ``ratelimit-policy`` and ``ratelimit`` with one list item
    per decision (``"rate"`` for a :class:`RateDecision`, ``"daily"`` for a
    :class:`QuotaDecision`), and ``retry-after`` when any of them rejected the request.

    Names are lower-case, as ASGI sends them. ``t`` is the seconds until the policy's quota is
    back: the full bucket or the next UTC midnight when allowed, and when rejected the moment
    a request will be allowed again, the same as ``retry-after`` (the draft asks that
    ``Retry-After`` not point before the end of the rejecting policy's window). ``None`` and
    degraded decisions carry no knowledge of the key's state and are left out.
    """
    policies: list[str] = []
    limits: list[str] = []
    waits: list[int] = []
    for decision in decisions:
        if decision is None or decision.degraded:
            continue
        if isinstance(decision, RateDecision):
            name, window = "rate", max(1, math.ceil(decision.period))
        else:
            name, window = "daily", DAY_SECONDS
        if any(item.startswith(f'"{name}";') for item in policies):
            raise ValueError(f"more than one {type(decision).__name__} given")
        if decision.allowed:
            reset = _ceil_seconds(decision.reset_after)
        else:
            reset = max(1, _ceil_seconds(decision.retry_after))  # a rejection never says "now"
            waits.append(reset)
        policies.append(f'"{name}";q={decision.limit};w={window}')
        limits.append(f'"{name}";r={decision.remaining};t={reset}')
    headers: dict[str, str] = {}
    if policies:
        headers["ratelimit-policy"] = ", ".join(policies)
        headers["ratelimit"] = ", ".join(limits)
    if waits:
        # The request can pass only once every rejecting policy allows it.
        headers["retry-after"] = str(max(waits))
    return headers


def limit_header_fields(
    rate: RateDecision | None, quota: QuotaDecision | None
) -> list[tuple[bytes, bytes]]:
    """:func:`rate_limit_headers` of one request's decisions as ASGI header pairs, built for
    the hot path: an admitted request's ``ratelimit-policy`` only changes with the key's limits,
    so it is rendered once per set of limits, and ``ratelimit`` is one format string."""
    if (rate is not None and not rate.allowed) or (quota is not None and not quota.allowed):
        return [(k.encode(), v.encode()) for k, v in rate_limit_headers(rate, quota).items()]
    if rate is not None and rate.degraded:
        rate = None
    if quota is not None and quota.degraded:
        quota = None
    if rate is None:
        if quota is None:
            return []
        value = f'"daily";r={quota.remaining};t={_ceil_seconds(quota.reset_after)}'
    elif quota is None:
        value = f'"rate";r={rate.remaining};t={_ceil_seconds(rate.reset_after)}'
    else:
        value = (
            f'"rate";r={rate.remaining};t={_ceil_seconds(rate.reset_after)}, '
            f'"daily";r={quota.remaining};t={_ceil_seconds(quota.reset_after)}'
        )
    policy = _policy_field(
        None if rate is None else (rate.limit, rate.period),
        None if quota is None else quota.limit,
    )
    return [(b"ratelimit-policy", policy), (b"ratelimit", value.encode())]


@functools.lru_cache(maxsize=1024)
def _policy_field(rate: tuple[int, float] | None, budget: int | None) -> bytes:
    items = []
    if rate is not None:
        items.append(f'"rate";q={rate[0]};w={max(1, math.ceil(rate[1]))}')
    if budget is not None:
        items.append(f'"daily";q={budget};w={DAY_SECONDS}')
    return ", ".join(items).encode()
