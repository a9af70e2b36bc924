"""The limits of :mod:`inferd.tenancy.limits` kept in Redis, shared by every API process.

Each decision is one Lua script run with EVALSHA (one round trip, atomic on the server):

``<prefix>rate:<key_id>``
    The key's GCRA theoretical arrival time in epoch microseconds, expiring when its bucket is
    full again (a missing key is a full bucket, so nothing is lost).
``<prefix>quota:<key_id>:<YYYY-MM-DD>``
    Tokens used that UTC day, expiring at the end of the next day.

The time is the app's ``clock`` passed as an argument, not Redis ``TIME``: tests can move it,
but every API process's clock must be NTP-synced (see :mod:`inferd.tenancy.limits`).

Redis outages: with ``fail_open`` the request is allowed and its decision marked ``degraded``;
without it :class:`~inferd.tenancy.limits.LimiterUnavailable` (503) is raised. A warning is
logged once per outage and an info line when Redis answers again. For ``recheck_interval``
after a failure, calls do not wait on Redis at all, so an outage does not add a timeout to
every request.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from inferd.errors import ConfigError
from inferd.tenancy.limits import (
    DAY_MICROS,
    Clock,
    LimiterUnavailable,
    QuotaDecision,
    Rate,
    RateDecision,
    check_count,
    day_index,
    day_of,
    degraded_rate,
    now_micros,
    quota_decision,
    rate_decision,
    usage_ttl_us,
)

if TYPE_CHECKING:
    from redis.asyncio import Redis
    from redis.commands.core import AsyncScript

__all__ = ["RedisLimiter"]

log = logging.getLogger("inferd.tenancy.limits")

# Mirrors limits.gcra. Times are integer microseconds, exact in Lua's doubles below 2**53;
# '%.0f' writes them back without the exponent that tostring() would use past 14 digits.
# ARGV: now, interval, limit. Reply: {allowed, remaining, reset_after, retry_after}.
_GCRA = """
local now = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local window = interval * tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + interval
if new_tat - now > window then
  return {0, 0, tat - now, new_tat - window - now}
end
local ttl = math.ceil((new_tat - now) / 1000)
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', string.format('%.0f', ttl))
return {1, math.floor((window - (new_tat - now)) / interval), new_tat - now, 0}
"""

# ARGV: budget, tokens, ttl in ms. Reply: {allowed, used}.
_RESERVE = """
local used = tonumber(redis.call('GET', KEYS[1]) or '0')
local tokens = tonumber(ARGV[2])
if used + tokens > tonumber(ARGV[1]) then
  return {0, used}
end
if tokens > 0 then
  used = redis.call('INCRBY', KEYS[1], tokens)
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return {1, used}
"""

# ARGV: delta, ttl in ms. Reply: the day's usage afterwards.
_SETTLE = """
local delta = tonumber(ARGV[1])
local current = redis.call('GET', KEYS[1])
if not current then
  if delta <= 0 then return 0 end
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return delta
end
local used = tonumber(current) + delta
if used < 0 then used = 0 end
redis.call('SET', KEYS[1], string.format('%.0f', used), 'KEEPTTL')
return used
"""


def _why(exc: BaseException) -> str:
    # redis-py's exceptions have a terse repr; say what happened.
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class RedisLimiter:
    """A :class:`~inferd.tenancy.limits.Limiter` in Redis, shared by every API process.

    ``timeout`` bounds each call (connecting, waiting for one of ``max_connections`` pooled
    connections, and the reply); past it Redis counts as down. ``failures`` counts the calls
    answered without Redis.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "inferd:limits:",
        fail_open: bool,
        clock: Clock = time.time,
        timeout: float = 0.25,
        max_connections: int = 64,
        recheck_interval: float = 1.0,
    ) -> None:
        try:
            from redis.asyncio import BlockingConnectionPool, Redis
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff
            from redis.exceptions import RedisError
        except ImportError as exc:  # pragma: no cover - depends on the install
            raise ConfigError("the Redis limiter needs: pip install 'inferd[redis]'") from exc
        self._prefix, self._fail_open, self._clock = prefix, fail_open, clock
        self._timeout, self._recheck = timeout, recheck_interval
        self._errors: tuple[type[BaseException], ...] = (RedisError, OSError, TimeoutError)
        # Blocking: a burst of requests queues for a connection instead of failing at once.
        # One retry rides over a pooled connection that died in a Redis restart; a reply lost
        # mid-flight may then count one request or reservation twice, erring on the strict side.
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout,
            socket_connect_timeout=timeout,
            socket_timeout=timeout,
            retry=Retry(NoBackoff(), 1),
        )
        self._redis: Redis = Redis.from_pool(pool)
        self._gcra = self._redis.register_script(_GCRA)
        self._reserve = self._redis.register_script(_RESERVE)
        self._settle = self._redis.register_script(_SETTLE)
        self._down = False
        self._retry_at = 0.0
        self.failures = 0

    async def _run(self, script: AsyncScript, key: str, args: Sequence[int | str]) -> Any:
        """The script's reply, or ``None`` when Redis failed and the limiter fails open."""
        if self._down and time.monotonic() < self._retry_at:
            return self._unavailable(None)
        try:
            async with asyncio.timeout(self._timeout):
                reply = await script(keys=[key], args=args)
        except self._errors as exc:
            self._retry_at = time.monotonic() + self._recheck
            if not self._down:
                self._down = True
                mode = "allowing requests unchecked" if self._fail_open else "rejecting requests"
                log.warning("limits: Redis unavailable, %s: %s", mode, _why(exc))
            return self._unavailable(exc)
        if self._down:
            self._down = False
            log.info("limits: Redis available again")
        return reply

    def _unavailable(self, exc: BaseException | None) -> None:
        self.failures += 1
        if not self._fail_open:
            raise LimiterUnavailable(
                "usage limits cannot be checked right now", retry_after=1
            ) from exc

    async def check_rate(self, key_id: str, rate: Rate) -> RateDecision:
        """Count one request of ``key_id`` against ``rate`` if it is allowed."""
        now = now_micros(self._clock)
        args = (now, rate.interval_us, rate.limit)
        reply = await self._run(self._gcra, f"{self._prefix}rate:{key_id}", args)
        if reply is None:
            return degraded_rate(rate)
        allowed, remaining, reset_after, retry_after = (int(v) for v in reply)
        return rate_decision(rate, (bool(allowed), 0, remaining, reset_after, retry_after))

    async def reserve(self, key_id: str, budget: int, tokens: int) -> QuotaDecision:
        """Take ``tokens`` from today's ``budget`` of ``key_id`` if they fit, atomically."""
        check_count("budget", budget)
        check_count("tokens", tokens)
        now = now_micros(self._clock)
        index, day = day_of(now)
        ttl_ms = -(-usage_ttl_us(index, now) // 1000)
        key = f"{self._prefix}quota:{key_id}:{day}"
        reply = await self._run(self._reserve, key, (budget, tokens, ttl_ms))
        if reply is None:
            return quota_decision(True, budget, 0, tokens, now, degraded=True)
        allowed, used = (int(v) for v in reply)
        return quota_decision(bool(allowed), budget, used, tokens, now)

    async def settle(
        self, key_id: str, reserved: int, actual: int, *, day: str | None = None
    ) -> None:
        """Add ``actual - reserved`` to the usage of ``day`` (default today), never below 0.
        Usage older than yesterday has expired: settling it does nothing. Fails like a
        reservation does (silently when failing open)."""
        check_count("reserved", reserved)
        check_count("actual", actual)
        now = now_micros(self._clock)
        index = now // DAY_MICROS if day is None else day_index(day)
        ttl_us = usage_ttl_us(index, now)
        if ttl_us <= 0 or actual == reserved:
            return
        _, name = day_of(index * DAY_MICROS)
        key = f"{self._prefix}quota:{key_id}:{name}"
        await self._run(self._settle, key, (actual - reserved, -(-ttl_us // 1000)))

    async def usage(self, key_id: str, *, day: str | None = None) -> tuple[str, int]:
        """``(day, tokens used)`` of ``key_id`` on ``day`` (default: the current UTC day); 0
        for days before yesterday, which are no longer kept. Raises
        :class:`~inferd.tenancy.limits.LimiterUnavailable` when Redis cannot answer, even when
        failing open: there is no safe guess at a number."""
        now = now_micros(self._clock)
        index = now // DAY_MICROS if day is None else day_index(day)
        _, name = day_of(index * DAY_MICROS)
        if usage_ttl_us(index, now) <= 0:
            return name, 0  # past retention by this clock, whatever Redis still holds
        try:
            async with asyncio.timeout(self._timeout):
                value = await self._redis.get(f"{self._prefix}quota:{key_id}:{name}")
        except self._errors as exc:
            raise LimiterUnavailable("usage cannot be read right now", retry_after=1) from exc
        return name, int(value or 0)

    async def close(self) -> None:
        """Close the connection pool."""
        await self._redis.aclose()
