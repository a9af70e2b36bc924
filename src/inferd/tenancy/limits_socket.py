"""The limits of :mod:`inferd.tenancy.limits` kept by one process and shared over a Unix socket.

``inferd serve --processes N`` without Redis: the N server processes must not each keep a
:class:`~inferd.tenancy.limits_memory.MemoryLimiter` of their own, or a key's rate and daily
budget would be N times what it says. The server then runs one more process,
:func:`serve_limits`, holding the one :class:`MemoryLimiter`, and each server process asks it
through a :class:`SocketLimiter`: one round trip on a Unix socket per decision, like Redis,
without Redis. Its state lives as long as the server (a restart forgets rates and today's
usage, as a one-process server's restart does).

The protocol: one JSON array per line each way, answered in order on each connection (so a
connection carries many requests at once). Requests are ``["r", key, limit, period]``
(:meth:`~inferd.tenancy.limits.Limiter.check_rate`), ``["q", key, budget, tokens]``
(``reserve``), ``["s", key, reserved, actual, day]`` (``settle``) and ``["u", key, day]``
(``usage``); a failure is answered ``["!", message]``.

When the limiter process cannot be reached (it is restarting), a call behaves as with Redis
down: allowed and marked ``degraded`` with ``fail_open``, else
:class:`~inferd.tenancy.limits.LimiterUnavailable` (503).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from datetime import UTC, datetime
from typing import Any

import orjson

from inferd.tenancy.limits import (
    Clock,
    LimiterUnavailable,
    QuotaDecision,
    Rate,
    RateDecision,
    check_count,
    degraded_rate,
    now_micros,
    quota_decision,
)
from inferd.tenancy.limits_memory import MemoryLimiter

__all__ = ["SocketLimiter", "serve_limits"]

log = logging.getLogger("inferd.tenancy.limits")

_LIMIT = 1 << 20  # longest line either way


class SocketLimiter:
    """A :class:`~inferd.tenancy.limits.Limiter` that asks the limiter process at ``path``.

    ``timeout`` bounds each call (connecting included); past it the limiter counts as down and
    for ``recheck_interval`` calls do not wait on it at all. ``failures`` counts the calls
    answered without it."""

    def __init__(
        self,
        path: str,
        *,
        fail_open: bool,
        timeout: float = 1.0,
        recheck_interval: float = 1.0,
        clock: Clock = time.time,
    ) -> None:
        self._path = path
        self._fail_open = fail_open
        self._timeout = timeout
        self._recheck = recheck_interval
        self._clock = clock
        self._writer: asyncio.StreamWriter | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._waiting: deque[asyncio.Future[Any]] = deque()
        self._connecting: asyncio.Lock | None = None
        self._down = False
        self._retry_at = 0.0
        self.failures = 0

    async def _connect(self) -> asyncio.StreamWriter:
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._writer is None:
                reader, writer = await asyncio.open_unix_connection(self._path, limit=_LIMIT)
                self._writer = writer
                self._reader_task = asyncio.get_running_loop().create_task(
                    self._read(reader, writer), name="limits-socket-reader"
                )
            return self._writer

    async def _read(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        why: BaseException = ConnectionResetError("the limiter process closed the connection")
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                future = self._waiting.popleft()
                if not future.done():
                    future.set_result(orjson.loads(line))
        except (OSError, ValueError, IndexError) as exc:
            why = exc
        finally:
            if self._writer is writer:
                self._writer = None
            writer.close()
            waiting, self._waiting = self._waiting, deque()
            for future in waiting:
                if not future.done():
                    future.set_exception(why)

    async def _call(self, request: list[Any]) -> Any:
        """The limiter's answer, or ``None`` when it failed and the limiter fails open."""
        if self._down and time.monotonic() < self._retry_at:
            return self._unavailable(None)
        try:
            async with asyncio.timeout(self._timeout):
                writer = self._writer or await self._connect()
                future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
                self._waiting.append(future)
                writer.write(orjson.dumps(request) + b"\n")
                reply = await future
        except (OSError, TimeoutError, ValueError) as exc:
            self._retry_at = time.monotonic() + self._recheck
            if self._writer is not None and isinstance(exc, TimeoutError):
                self._writer.close()  # answers would now pair with the wrong requests
                self._writer = None
            if not self._down:
                self._down = True
                mode = "allowing requests unchecked" if self._fail_open else "rejecting requests"
                log.warning("limits: the limiter process is unavailable, %s: %r", mode, exc)
            return self._unavailable(exc)
        if self._down:
            self._down = False
            log.info("limits: the limiter process answers again")
        if reply and reply[0] == "!":
            raise ValueError(reply[1])
        return reply

    def _unavailable(self, exc: BaseException | None) -> None:
        self.failures += 1
        if not self._fail_open:
            raise LimiterUnavailable(
                "usage limits cannot be checked right now", retry_after=1
            ) from exc

    async def check_rate(self, key_id: str, rate: Rate) -> RateDecision:
        """Count one request of ``key_id`` against ``rate`` if it is allowed."""
        reply = await self._call(["r", key_id, rate.limit, rate.period])
        if reply is None:
            return degraded_rate(rate)
        allowed, remaining, reset_after, retry_after = reply
        return RateDecision(
            bool(allowed), rate.limit, remaining, reset_after, retry_after, rate.period
        )

    async def reserve(self, key_id: str, budget: int, tokens: int) -> QuotaDecision:
        """Take ``tokens`` from today's ``budget`` of ``key_id`` if they fit, atomically."""
        check_count("budget", budget)
        check_count("tokens", tokens)
        reply = await self._call(["q", key_id, budget, tokens])
        if reply is None:
            return quota_decision(True, budget, 0, tokens, now_micros(self._clock), degraded=True)
        allowed, remaining, reset_at, retry_after, day, reserved, reset_after = reply
        return QuotaDecision(
            bool(allowed),
            budget,
            remaining,
            datetime.fromtimestamp(reset_at, UTC),
            retry_after,
            day,
            reserved,
            reset_after,
        )

    async def settle(
        self, key_id: str, reserved: int, actual: int, *, day: str | None = None
    ) -> None:
        """Add ``actual - reserved`` to the usage of ``day`` (default today), never below 0."""
        check_count("reserved", reserved)
        check_count("actual", actual)
        if actual != reserved:
            await self._call(["s", key_id, reserved, actual, day])

    async def usage(self, key_id: str, *, day: str | None = None) -> tuple[str, int]:
        """``(day, tokens used)``; :class:`~inferd.tenancy.limits.LimiterUnavailable` when the
        limiter process cannot answer, even when failing open."""
        try:
            reply = await self._call(["u", key_id, day])
        except LimiterUnavailable:
            raise
        if reply is None:
            raise LimiterUnavailable("usage cannot be read right now", retry_after=1)
        return str(reply[0]), int(reply[1])

    async def close(self) -> None:
        """Close the connection."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._reader_task is not None:
            self._reader_task.cancel()
            await asyncio.gather(self._reader_task, return_exceptions=True)


def _answer(limiter: MemoryLimiter, request: list[Any]) -> list[Any]:
    op, key = request[0], request[1]
    if op == "r":
        rate = Rate(int(request[2]), float(request[3]))
        d = limiter.check_rate_now(key, rate)
        return [d.allowed, d.remaining, d.reset_after, d.retry_after]
    if op == "q":
        q = limiter.reserve_now(key, request[2], request[3])
        return [
            q.allowed,
            q.remaining,
            q.reset_at.timestamp(),
            q.retry_after,
            q.day,
            q.reserved,
            q.reset_after,
        ]
    raise ValueError(f"unknown limiter request {op!r}")


async def _answer_async(limiter: MemoryLimiter, request: list[Any]) -> list[Any]:
    op, key = request[0], request[1]
    if op == "s":
        await limiter.settle(key, request[2], request[3], day=request[4])
        return []
    if op == "u":
        return list(await limiter.usage(key, day=request[2]))
    return _answer(limiter, request)


async def _serve_connection(
    limiter: MemoryLimiter, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        while line := await reader.readline():
            try:
                reply = await _answer_async(limiter, orjson.loads(line))
            except Exception as exc:  # a bad request is answered, the connection kept
                reply = ["!", str(exc) or repr(exc)]
            writer.write(orjson.dumps(reply) + b"\n")
    except (OSError, ValueError):
        pass  # the server process went away (or sent a line past the limit)
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def serve_limits(
    path: str,
    stop: asyncio.Event,
    limiter: MemoryLimiter | None = None,
    listening: asyncio.Event | None = None,
) -> None:
    """Answer :class:`SocketLimiter` calls on the Unix socket ``path`` until ``stop`` is set;
    ``listening`` is set once calls can connect."""
    held = limiter if limiter is not None else MemoryLimiter()

    async def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await _serve_connection(held, reader, writer)

    server = await asyncio.start_unix_server(connected, path=path, limit=_LIMIT)
    async with server:
        if listening is not None:
            listening.set()
        await stop.wait()
