"""Server-Sent Events, read incrementally, as the HTML standard's event-stream parser does.

:class:`SSEDecoder` takes the body in whatever pieces the network delivers (a line, a frame
or a field may be cut anywhere, ``\\r\\n`` included) and returns each complete event once its
blank line arrives. :class:`Resume` remembers the last event id and the server's ``retry:``
so a dropped stream can be reopened with ``Last-Event-ID`` and every event seen exactly once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from inferd.client._retry import RetryPolicy
from inferd.client.errors import ConnectionFailed, InferdClientError, StreamInterrupted
from inferd.client.types import Event, event_from_sse

__all__ = ["Follow", "Resume", "SSEDecoder", "ServerSentEvent"]


@dataclass(frozen=True, slots=True)
class ServerSentEvent:
    """One dispatched event: its name (``message`` when none was sent), data and id."""

    event: str
    data: str
    id: str | None
    retry: int | None = None


class SSEDecoder:
    """Feed bytes, get events. Comments (``: keep-alive``) and unknown fields are ignored."""

    def __init__(self) -> None:
        self._buffer = b""
        self._pending_cr = False  # the last piece ended in \r: a \n right after belongs to it
        self._first = True  # a UTF-8 BOM may open the stream
        self._event = ""
        self._data: list[str] = []
        self._has_data = False
        self._retry: int | None = None
        self.last_event_id: str | None = None
        """The last ``id:`` field seen (kept across events, as the standard says)."""
        self.retry: int | None = None
        """The last ``retry:`` the server sent, in milliseconds."""

    def feed(self, chunk: bytes) -> list[ServerSentEvent]:
        if not chunk:
            return []
        if self._pending_cr and chunk.startswith(b"\n"):
            chunk = chunk[1:]
        self._pending_cr = False
        if self._first:
            self._buffer += chunk
            if len(self._buffer) < 3 and b"\xef\xbb\xbf".startswith(self._buffer):
                return []  # not enough bytes yet to tell whether a BOM opens the stream
            self._first = False
            if self._buffer.startswith(b"\xef\xbb\xbf"):
                self._buffer = self._buffer[3:]
            chunk, self._buffer = self._buffer, b""
        data = self._buffer + chunk
        events: list[ServerSentEvent] = []
        start = 0
        size = len(data)
        while start < size:
            cr = data.find(b"\r", start)
            lf = data.find(b"\n", start)
            if cr < 0 and lf < 0:
                break
            if cr < 0 or (0 <= lf < cr):
                end, nxt = lf, lf + 1
            elif cr + 1 < size:
                end, nxt = cr, cr + 2 if data[cr + 1 : cr + 2] == b"\n" else cr + 1
            else:  # \r at the very end: the line is complete; skip a \n that may follow
                end, nxt = cr, cr + 1
                self._pending_cr = True
            event = self._line(data[start:end].decode("utf-8", errors="replace"))
            if event is not None:
                events.append(event)
            start = nxt
        self._buffer = data[start:]
        return events

    def _line(self, line: str) -> ServerSentEvent | None:
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._data.append(value)
            self._has_data = True
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self.retry = self._retry = int(value)
        return None

    def _dispatch(self) -> ServerSentEvent | None:
        event, data, has_data, retry = self._event, self._data, self._has_data, self._retry
        self._event, self._data, self._has_data, self._retry = "", [], False, None
        if not has_data:
            return None  # the standard dispatches nothing without a data line
        return ServerSentEvent(event or "message", "\n".join(data), self.last_event_id, retry)


class Resume:
    """Where a followed stream stands: the last event id handed out and the server's retry.

    Events with an id at or below the last one are dropped, so a server that replays more
    than asked never makes the caller see an event twice."""

    def __init__(self, last_event_id: int | None = None) -> None:
        self.last_id = last_event_id
        self.retry_ms: int | None = None

    def header(self) -> dict[str, str]:
        return {} if self.last_id is None else {"last-event-id": str(self.last_id)}

    def accept(self, event: ServerSentEvent) -> bool:
        """Whether the event is new; remembers its id. An event without a numeric id cannot be
        told apart from a replay, so it is always new (inferd numbers every event)."""
        if event.id is None or not (event.id.isascii() and event.id.isdigit()):
            return True
        seq = int(event.id)
        if self.last_id is not None and seq <= self.last_id:
            return False
        self.last_id = seq
        return True


class Follow:
    """The state of following one request's events across connections.

    :meth:`open` starts a connection (its ``Last-Event-ID`` header); :meth:`feed` turns the
    body's bytes into typed events, each at most once; :meth:`next_delay` says how long to
    wait before reconnecting after a failure, or raises once ``max_reconnects`` failures in a
    row brought no new event (a stream that makes progress may break any number of times).
    """

    def __init__(self, last_event_id: int | None, max_reconnects: int, policy: RetryPolicy) -> None:
        if max_reconnects < 0:
            raise ValueError("max_reconnects must be >= 0")
        self.resume = Resume(last_event_id)
        self.max_reconnects = max_reconnects
        self.policy = policy
        self.failures = 0
        self.reconnects = 0
        self._decoder = SSEDecoder()

    def open(self) -> dict[str, str]:
        self._decoder = SSEDecoder()  # a frame cut off by the drop is not finished later
        return {"accept": "text/event-stream", **self.resume.header()}

    def feed(self, chunk: bytes) -> list[Event]:
        events: list[Event] = []
        for sse in self._decoder.feed(chunk):
            if not self.resume.accept(sse):
                continue
            self.failures = 0
            try:
                data: Any = json.loads(sse.data)
            except ValueError:
                data = sse.data
            seq = int(sse.id) if sse.id is not None and sse.id.isdigit() else None
            events.append(event_from_sse(sse.event, seq, data))
        if self._decoder.retry is not None:
            self.resume.retry_ms = self._decoder.retry
        return events

    def next_delay(self, error: InferdClientError) -> float:
        """Seconds to wait before reconnecting after ``error``; raises when giving up."""
        if not isinstance(error, ConnectionFailed) and error.status not in (429, 503):
            raise error  # 404, 401...: reconnecting cannot help
        self.failures += 1
        if self.failures > self.max_reconnects:
            raise StreamInterrupted(
                f"the event stream broke {self.failures} times in a row without a new event "
                f"(last: {error.message}); resume later from event {self.resume.last_id}",
                retryable=True,
            ) from error
        self.reconnects += 1
        if error.retry_after is not None:
            delay = error.retry_after
        elif self.resume.retry_ms is not None:
            delay = self.resume.retry_ms / 1000.0
        else:
            delay = self.policy.backoff * 2 ** (self.failures - 1)
        return min(delay, self.policy.max_wait)
