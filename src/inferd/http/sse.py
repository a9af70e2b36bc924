"""Server-Sent Events without HTTP: frames, ``Last-Event-ID``, and following a request.

:func:`follow` turns a request's stored events into SSE frames: everything after the client's
``Last-Event-ID`` first, then new events as the bus announces them, until a terminal event.
The store is the source of truth; the bus only saves waiting for the next poll.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson

from inferd.errors import BadRequest, NotFound
from inferd.jobs.events import SupportsReady
from inferd.jobs.types import EventBus, EventKind, RequestStore

__all__ = ["follow", "format_comment", "format_event", "parse_last_event_id"]

log = logging.getLogger("inferd.http.sse")

_FINAL = frozenset({EventKind.DONE, EventKind.ERROR})
_PAGE = 1000  # events per store read; a longer backlog is read in several
_MAX_ID = 2**63 - 1  # what a SQL BIGINT holds


def _lines(field: bytes, value: bytes) -> bytes:
    # A value with line breaks becomes one field line per line; the client joins them with \n.
    return b"".join(b"%s: %s\n" % (field, line) for line in value.splitlines() or [b""])


def format_event(event_id: int | None, event: str, data: Any, retry_ms: int | None = None) -> bytes:
    """One SSE frame: ``id:``, ``event:``, ``retry:`` and ``data:`` lines and a blank line.

    ``data`` is encoded as JSON with orjson, except ``bytes``, which are taken as already
    encoded; either way each of its lines becomes a ``data:`` line."""
    if "\n" in event or "\r" in event:
        raise ValueError("an SSE event name cannot contain a line break")
    if retry_ms is not None and retry_ms < 0:
        raise ValueError("retry_ms must be >= 0")
    payload = data if isinstance(data, bytes) else orjson.dumps(data)
    head = b"" if event_id is None else b"id: %d\n" % event_id
    head += b"event: %s\n" % event.encode()
    if retry_ms is not None:
        head += b"retry: %d\n" % retry_ms
    return head + _lines(b"data", payload) + b"\n"


def format_comment(text: str = "keep-alive", retry_ms: int | None = None) -> bytes:
    """A comment frame (``: keep-alive``) that clients ignore and proxies see as traffic;
    with ``retry_ms``, it also sets the client's reconnection delay."""
    head = b"" if retry_ms is None else b"retry: %d\n" % retry_ms
    return head + _lines(b"", text.encode()) + b"\n"


def parse_last_event_id(value: str | None) -> int:
    """The seq to resume after: 0 when the header is missing or empty, else a non-negative
    integer; anything else raises :class:`~inferd.errors.BadRequest`."""
    if value is None or not value.strip():
        return 0
    text = value.strip()
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) > _MAX_ID:
        raise BadRequest(
            f"Last-Event-ID must be a non-negative integer (an event id), got {value[:40]!r}"
        )
    return int(text)


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

    async def wait(self, within: float) -> int | None:
        """The next announced seq, or None after ``within`` seconds (or early, once the bus
        has ended)."""
        if not self._alive:
            await asyncio.sleep(within)  # the bus went away: polling the store still works
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


async def follow(
    store: RequestStore,
    bus: EventBus,
    request_id: str,
    after: int = 0,
    *,
    keepalive: float = 15.0,
    poll: float = 2.0,
    retry_ms: int = 1000,
    user: str | None = None,
) -> AsyncGenerator[bytes, None]:
    """SSE frames for the events of ``request_id`` with ``seq > after``, then live ones.

    Subscribes first, then replays the store, so nothing published in between is missed.
    Each event is sent once, in seq order (id = seq, event = kind, data = event data); the
    first frame carries ``retry:``. Waits for the bus, but re-reads the store every ``poll``
    seconds anyway (a lost notification only delays delivery) and sends a keep-alive comment
    after ``keepalive`` seconds without a frame. Ends after a ``done`` or ``error`` event, or
    once a terminal request has nothing more to send. Raises
    :class:`~inferd.errors.NotFound` before any frame if the request does not exist (or,
    with ``user``, belongs to someone else)."""
    if keepalive <= 0 or poll <= 0:
        raise ValueError("keepalive and poll must be > 0")
    record = await store.get(request_id, user)
    if record is None:
        raise NotFound(f"no request {request_id!r}")
    final_seq = record.last_seq if record.terminal else None
    loop = asyncio.get_running_loop()
    last, idle_poll = after, False
    retry: int | None = retry_ms  # sent on the first frame only
    listener = _Listener(bus.subscribe(request_id))
    try:
        await listener.ready()
        last_frame = loop.time()
        while True:
            events = await store.events(request_id, last, _PAGE)
            for event in events:
                if event.seq <= last:
                    continue  # a store that ignored ``after``: never send an id twice
                yield format_event(event.seq, event.kind, event.data, retry)
                last, retry, last_frame = event.seq, None, loop.time()
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
            while True:  # wait for something to read, sending keep-alives meanwhile
                now = loop.time()
                if now - last_frame >= keepalive:
                    yield format_comment("keep-alive", retry)
                    retry, last_frame = None, loop.time()
                elif now - read_at >= poll:
                    idle_poll = True
                    break
                else:
                    seq = await listener.wait(min(read_at + poll, last_frame + keepalive) - now)
                    if seq is not None and seq > last:
                        break  # a seq already sent (replayed, then announced) needs no read
    finally:
        await listener.close()
