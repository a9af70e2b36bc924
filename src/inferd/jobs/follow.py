"""Following a long-running request: its stored events, then live ones, as they come.

The store is the source of truth; the bus only saves waiting for the next poll. Transports
(SSE in :mod:`inferd.http.sse`, WebSocket) turn what :func:`follow_events` yields into frames.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator

from inferd.errors import NotFound
from inferd.jobs.events import Subscription, SupportsReady, SupportsTake
from inferd.jobs.types import Event, EventBus, EventKind, RequestStore

__all__ = ["follow_events"]

log = logging.getLogger("inferd.jobs.follow")

_FINAL = frozenset({EventKind.DONE, EventKind.ERROR})
_PAGE = 1000  # events per store read; a longer backlog is read in several


class _Listener:
    """A bus subscription waited on with timeouts. One ``anext`` stays pending across waits:
    cancelling it could end an async-generator subscription for good."""

    def __init__(self, sub: AsyncIterator[int]) -> None:
        self._sub = sub
        self._next: asyncio.Future[int] | None = None
        self._alive = True

    async def ready(self) -> None:
        if isinstance(self._sub, SupportsReady):
            await self._sub.ready()

    def take(self, after: int, upto: int) -> list[Event]:
        """The events ``after + 1`` to ``upto`` if the bus carried every one, else none."""
        if isinstance(self._sub, SupportsTake):
            return self._sub.take(after, upto)
        return []

    async def wait(self, within: float) -> int | None:
        """The next announced seq, or None after ``within`` seconds (or early, once the bus
        has ended)."""
        if not self._alive:
            await asyncio.sleep(within)  # the bus went away: polling the store still works
            return None
        if self._next is None and isinstance(self._sub, Subscription):
            try:  # the buses' own subscription: waited on in this task
                return await self._sub.next_within(within)
            except StopAsyncIteration:
                self._alive = False
                return None
        if self._next is None:
            self._next = asyncio.ensure_future(anext(self._sub))
        done, _ = await asyncio.wait({self._next}, timeout=within)
        if not done:
            return None
        future, self._next = self._next, None
        try:
            return future.result()
        except StopAsyncIteration:
            pass
        except Exception:
            log.warning("sse: event bus subscription failed; polling the store", exc_info=True)
        self._alive = False
        return None

    async def close(self) -> None:
        if self._next is not None:
            # An async generator refuses aclose() while an anext runs: stop that first.
            self._next.cancel()
            await asyncio.wait({self._next})
            if not self._next.cancelled():
                self._next.exception()  # retrieved, so that asyncio does not log it
            self._next = None
        aclose = getattr(self._sub, "aclose", None)
        if aclose is not None:
            await aclose()


async def follow_events(
    store: RequestStore,
    bus: EventBus,
    request_id: str,
    after: int = 0,
    *,
    keepalive: float = 15.0,
    poll: float = 2.0,
    user: str | None = None,
) -> AsyncGenerator[Event | None, None]:
    """The events of ``request_id`` with ``seq > after``, then live ones, until the end.

    Subscribes first, then replays the store, so nothing published in between is missed.
    Each event is yielded once, in seq order. Events the bus carried (published by
    ``publish_events``) are yielded as they came when every one up to the announced seq is
    there; otherwise they are read from the store. Waits for the bus, but re-reads the store every
    ``poll`` seconds anyway (a lost notification only delays delivery), and yields ``None``
    after ``keepalive`` seconds without an event (a transport sends a keep-alive then). Ends
    after a ``done`` or ``error`` event, or once a terminal request has nothing more to send.
    Raises :class:`~inferd.errors.NotFound` before anything is yielded if the request does not
    exist (or, with ``user``, belongs to someone else)."""
    if keepalive <= 0 or poll <= 0:
        raise ValueError("keepalive and poll must be > 0")
    record = await store.get(request_id, user)
    if record is None:
        raise NotFound(f"no request {request_id!r}")
    final_seq = record.last_seq if record.terminal else None
    loop = asyncio.get_running_loop()
    last, idle_poll = after, False
    listener = _Listener(bus.subscribe(request_id))
    try:
        await listener.ready()
        last_sent = loop.time()
        carried: list[Event] = []
        while True:
            events = carried or await store.events(request_id, last, _PAGE)
            carried = []
            for event in events:
                if event.seq <= last:
                    continue  # a store that ignored ``after``: never send an id twice
                yield event
                last, last_sent = event.seq, loop.time()
                if event.kind in _FINAL:
                    return
            if len(events) >= _PAGE:
                continue
            if idle_poll and not events:
                # Nothing announced and nothing new: re-check the record, so a request that
                # ended without a terminal event (or was deleted) does not hold the stream.
                record = await store.get(request_id, user)
                if record is None:
                    return
                final_seq = record.last_seq if record.terminal else None
            if final_seq is not None and last >= final_seq:
                return
            read_at, idle_poll = loop.time(), False
            while True:  # wait for something to read, yielding keep-alive ticks meanwhile
                now = loop.time()
                if now - last_sent >= keepalive:
                    yield None
                    last_sent = loop.time()
                elif now - read_at >= poll:
                    idle_poll = True
                    break
                else:
                    seq = await listener.wait(min(read_at + poll, last_sent + keepalive) - now)
                    if seq is not None and seq > last:
                        carried = listener.take(last, seq)  # none: read the store
                        break  # a seq already sent (replayed, then announced) needs no read
    finally:
        await listener.close()
