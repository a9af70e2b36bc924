"""Server-Sent Events: frames, ``Last-Event-ID``, and a followed request as a frame stream.

:func:`frames` turns what :func:`inferd.jobs.follow.follow_events` yields into SSE frames (the
first one carries ``retry:``, keep-alive ticks become comments); :func:`follow` is the two
together: everything after the client's ``Last-Event-ID`` first, then new events as they come,
until a terminal event.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

import orjson

from inferd.errors import BadRequest
from inferd.jobs.follow import follow_events
from inferd.jobs.types import Event, EventBus, RequestStore

__all__ = ["follow", "format_comment", "format_event", "frames", "parse_last_event_id"]

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


async def frames(
    events: AsyncIterator[Event | None], retry_ms: int | None = 1000
) -> AsyncGenerator[bytes, None]:
    """SSE frames of a followed request: id = seq, event = kind, data = event data; ``None``
    (nothing for a while) becomes a keep-alive comment. The first frame carries ``retry:``."""
    retry = retry_ms
    try:
        async for event in events:
            if event is None:
                yield format_comment("keep-alive", retry)
            else:
                yield format_event(event.seq, event.kind, event.data, retry)
            retry = None
    finally:
        aclose = getattr(events, "aclose", None)
        if aclose is not None:
            await aclose()


def follow(
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
    """SSE frames for the events of ``request_id`` with ``seq > after``, then live ones (see
    :func:`~inferd.jobs.follow.follow_events`)."""
    events = follow_events(store, bus, request_id, after, keepalive=keepalive, poll=poll, user=user)
    return frames(events, retry_ms)
