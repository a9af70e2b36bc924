"""The in-process :class:`~inferd.tenancy.limits.Limiter`: one process, no I/O, no awaits."""

from __future__ import annotations

import time
from collections import OrderedDict

from inferd.tenancy.limits import (
    DAY_MICROS,
    MICROS,
    Clock,
    QuotaDecision,
    Rate,
    RateDecision,
    check_count,
    day_index,
    day_of,
    gcra,
    now_micros,
    quota_decision,
    rate_decision,
    usage_ttl_us,
)

__all__ = ["MemoryLimiter"]


class MemoryLimiter:
    """A :class:`~inferd.tenancy.limits.Limiter` for one process (one event loop; every method is
    atomic because none awaits). Memory is bounded: at most ``max_keys`` rate states and as
    many day-usage records, the least recently used dropped first; every ``sweep_interval``
    seconds, keys whose bucket is full again and usage older than yesterday are dropped, which
    loses nothing. Dropping a live key early (more than ``max_keys`` keys busy within one
    period) forgets its recent requests, so size ``max_keys`` above the number of keys active
    at once."""

    def __init__(
        self, *, clock: Clock = time.time, max_keys: int = 100_000, sweep_interval: float = 60.0
    ) -> None:
        if max_keys < 1:
            raise ValueError(f"max_keys must be at least 1, not {max_keys}")
        self._clock = clock
        self._max_keys = max_keys
        self._sweep_us = max(1, round(sweep_interval * MICROS))
        self._next_sweep = 0
        self._tats: OrderedDict[str, int] = OrderedDict()
        self._usage: OrderedDict[tuple[str, int], int] = OrderedDict()

    def __len__(self) -> int:
        """Records held: rate states plus day-usage records."""
        return len(self._tats) + len(self._usage)

    def _now(self) -> int:
        now = now_micros(self._clock)
        if now >= self._next_sweep:
            self._next_sweep = now + self._sweep_us
            self._sweep(now)
        return now

    def _sweep(self, now: int) -> None:
        for key in [key for key, tat in self._tats.items() if tat <= now]:
            del self._tats[key]
        today = now // DAY_MICROS
        for record in [record for record in self._usage if record[1] < today - 1]:
            del self._usage[record]

    def _store_usage(self, record: tuple[str, int], used: int) -> None:
        self._usage[record] = used
        self._usage.move_to_end(record)
        while len(self._usage) > self._max_keys:
            self._usage.popitem(last=False)

    async def check_rate(self, key_id: str, rate: Rate) -> RateDecision:
        """Count one request of ``key_id`` against ``rate`` if it is allowed."""
        return self.check_rate_now(key_id, rate)

    def check_rate_now(self, key_id: str, rate: Rate) -> RateDecision:
        """:meth:`check_rate` without a coroutine (this backend never waits)."""
        now = self._now()
        step = gcra(self._tats.get(key_id, 0), now, rate.interval_us, rate.limit)
        if step[0]:
            self._tats[key_id] = step[1]
        if key_id in self._tats:
            self._tats.move_to_end(key_id)
            while len(self._tats) > self._max_keys:
                self._tats.popitem(last=False)
        return rate_decision(rate, step)

    async def reserve(self, key_id: str, budget: int, tokens: int) -> QuotaDecision:
        """Take ``tokens`` from today's ``budget`` of ``key_id`` if they fit."""
        return self.reserve_now(key_id, budget, tokens)

    def reserve_now(self, key_id: str, budget: int, tokens: int) -> QuotaDecision:
        """:meth:`reserve` without a coroutine (this backend never waits)."""
        check_count("budget", budget)
        check_count("tokens", tokens)
        now = self._now()
        record = (key_id, now // DAY_MICROS)
        used = self._usage.get(record, 0)
        if used + tokens > budget:
            return quota_decision(False, budget, used, tokens, now)
        if tokens:
            used += tokens
            self._store_usage(record, used)
        return quota_decision(True, budget, used, tokens, now)

    async def settle(
        self, key_id: str, reserved: int, actual: int, *, day: str | None = None
    ) -> None:
        """Add ``actual - reserved`` to the usage of ``day`` (default today), never below 0.
        Usage older than yesterday is gone: settling it does nothing."""
        check_count("reserved", reserved)
        check_count("actual", actual)
        now = self._now()
        index = now // DAY_MICROS if day is None else day_index(day)
        if usage_ttl_us(index, now) <= 0:
            return
        record, delta = (key_id, index), actual - reserved
        used = self._usage.get(record)
        if used is None and delta <= 0:
            return
        self._store_usage(record, max(0, (used or 0) + delta))

    async def usage(self, key_id: str, *, day: str | None = None) -> tuple[str, int]:
        """``(day, tokens used)`` of ``key_id`` on ``day`` (default: the current UTC day); 0
        for days before yesterday, which are no longer kept."""
        now = self._now()
        index = now // DAY_MICROS if day is None else day_index(day)
        _, name = day_of(index * DAY_MICROS)
        if usage_ttl_us(index, now) <= 0:
            return name, 0  # past retention, whether or not a sweep has dropped it yet
        return name, self._usage.get((key_id, index), 0)

    async def close(self) -> None:
        """Forget every key."""
        self._tats.clear()
        self._usage.clear()
