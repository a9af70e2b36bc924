"""The limiter process of a several-process server, over a real Unix socket."""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

import pytest

from inferd.tenancy.limits import LimiterUnavailable, Rate
from inferd.tenancy.limits_memory import MemoryLimiter
from inferd.tenancy.limits_socket import SocketLimiter, serve_limits


async def test_two_clients_share_one_rate_and_one_budget() -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "limits.sock")
        stop = asyncio.Event()
        listening = asyncio.Event()
        host = asyncio.create_task(serve_limits(path, stop, listening=listening))
        await listening.wait()
        a, b = (SocketLimiter(path, fail_open=False) for _ in range(2))
        try:
            rate = Rate(5, 3600.0)
            decisions = await asyncio.gather(
                *(c.check_rate("k", rate) for c in (a, b) * 5)  # in flight at once
            )
            assert [d.allowed for d in decisions].count(True) == 5
            refused = [d for d in decisions if not d.allowed]
            assert all(d.retry_after > 0 and d.remaining == 0 for d in refused)

            first = await a.reserve("k", 10, 7)
            assert first.allowed and first.remaining == 3 and first.reserved == 7
            second = await b.reserve("k", 10, 7)
            assert not second.allowed and second.retry_after > 0
            await b.settle("k", 7, 2, day=first.day)
            assert await a.usage("k") == (first.day, 2)
            with pytest.raises(ValueError, match="budget must be"):
                await a.reserve("k", -1, 1)
        finally:
            await a.close()
            await b.close()
            stop.set()
            await host


async def test_an_absent_limiter_fails_open_or_closed_as_set() -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = str(Path(folder) / "none.sock")
        open_ = SocketLimiter(path, fail_open=True)
        decision = await open_.check_rate("k", Rate(1, 1.0))
        assert decision.allowed and decision.degraded
        assert (await open_.reserve("k", 1, 5)).degraded
        closed = SocketLimiter(path, fail_open=False)
        with pytest.raises(LimiterUnavailable):
            await closed.check_rate("k", Rate(1, 1.0))
        assert open_.failures == 2 and closed.failures == 1
        # It answers once the limiter process is back (after the recheck interval).
        stop = asyncio.Event()
        back = SocketLimiter(path, fail_open=False, recheck_interval=0.0)
        with pytest.raises(LimiterUnavailable):
            await back.check_rate("k", Rate(1, 1.0))
        listening = asyncio.Event()
        host = asyncio.create_task(serve_limits(path, stop, MemoryLimiter(), listening))
        await listening.wait()
        try:
            assert (await back.check_rate("k", Rate(1, 1.0))).allowed
        finally:
            await back.close()
            stop.set()
            await host
