"""inferd's HTTP/1.1 connection protocol: uvicorn's httptools protocol, leaner per request.

uvicorn runs every connection with :class:`HttpProtocol` (``uvicorn.Config(http=...)``). It
keeps uvicorn's parsing, pipelining, flow control, upgrades and ASGI semantics, and changes
three things that cost on every request of a busy server (bench/README.md, "The synchronous
path at the limit"):

- **One write per answer.** A response whose length is known (``content-length``, no
  ``transfer-encoding``: every JSON answer) is sent with one ``write`` of the status line,
  headers and body, where uvicorn writes the head and then the body: one system call and, with
  ``TCP_NODELAY``, one packet and one wake-up of the client instead of two. A streamed
  response (SSE, chunked) writes its head at once, as before.
- **Headers checked in two searches**, not two per header: the names joined by ``-`` and the
  values joined by a tab go through uvicorn's own patterns (a tab is allowed in a value and
  ``-`` in a name, so joining hides nothing).
- **One keep-alive timer per idle spell**, not one per request: the timer is armed when the
  connection goes idle and, when it fires, re-armed for what is left if a request came since.
- **Direct requests.** An app may name routes it answers directly (:class:`DirectApp`: inferd's
  prediction routes). Such a request with a small body (a ``content-length`` of at most
  :data:`DIRECT_MAX_BODY`, no ``expect: 100-continue``) gets a :class:`Direct` instead of
  uvicorn's request cycle: its body is buffered by the protocol, the app's coroutine starts
  when the body is complete (the app itself, not the wrappers in front of it), it receives the
  body with no event to wait on, and it answers either with ASGI messages or, on the
  prediction path, with one call (:meth:`Direct.respond`) that writes the status line, the
  headers and the body without the messages, their checks and their two awaits.
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from typing import Any, Protocol

import httptools
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

__all__ = ["DIRECT_MAX_BODY", "Direct", "DirectApp", "HttpProtocol"]

DIRECT_MAX_BODY = 65_536
"""Largest body (bytes, by its ``content-length``) of a request served as :class:`Direct`:
what uvicorn buffers before it pauses reading. Larger bodies take uvicorn's cycle, which
streams them to the app with flow control."""

_rendered: tuple[object, bytes] = (None, b"")  # the server's default headers, as bytes


def _default_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    """``headers`` (uvicorn's ``date`` and configured headers, a list replaced every second)
    rendered once per list."""
    global _rendered
    if _rendered[0] is not headers:
        _rendered = (headers, b"".join(b"%s: %s\r\n" % pair for pair in headers))
    return _rendered[1]


def _check_fields(names: list[bytes], values: list[bytes]) -> None:
    """uvicorn's checks of a response's header names and values, in two searches: the names
    joined by ``-`` and the values by a tab (allowed in a name and a value: joining hides
    nothing)."""
    if HEADER_RE.search(b"-".join(names)):
        raise RuntimeError("Invalid HTTP header name.")
    if HEADER_VALUE_RE.search(b"\t".join(values)):
        raise RuntimeError("Invalid HTTP header value.")


class _Cycle(RequestResponseCycle):
    """A request and its response; holds a fixed-length response's head for its body."""

    _head: bytes | None = None

    async def send(self, message: Any) -> None:
        head = self._head
        if head is not None:  # the head is held: this is the first part of the body
            self._head = None
            await self._send_with_head(head, message)
            return
        if (
            not self.response_started
            and message["type"] == "http.response.start"
            and not self.access_log
            and not self.disconnected
            and not self.flow.write_paused
            and self.scope["method"] != "HEAD"
        ):
            head = self._fixed_head(message)
            if head is not None:
                self.response_started = True
                self.waiting_for_100_continue = False
                self._head = head
                return
        await super().send(message)

    def _fixed_head(self, message: Any) -> bytes | None:
        """The status line and headers of a response with a known length; None for any
        other (uvicorn's own ``send`` handles it)."""
        headers = message.get("headers", ())
        length = None
        names = []
        for name, value in headers:
            lowered = name.lower()
            if lowered == b"content-length":
                length = value
            elif lowered == b"transfer-encoding" or lowered == b"connection":
                return None
            names.append(lowered)
        if length is None:
            return None
        values = [value for _, value in headers]
        _check_fields(names, values)
        self.expected_content_length = int(length)
        self.chunked_encoding = False
        parts = [STATUS_LINE[message["status"]], _default_headers(self.default_headers)]
        parts.extend([b"%s: %s\r\n" % pair for pair in zip(names, values, strict=True)])
        parts.append(b"\r\n" if self.keep_alive else b"connection: close\r\n\r\n")
        return b"".join(parts)

    async def _send_with_head(self, head: bytes, message: Any) -> None:
        if message["type"] != "http.response.body":
            raise RuntimeError(
                f"Expected ASGI message 'http.response.body', but got '{message['type']}'."
            )
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        body = message.get("body", b"")
        size = len(body)
        if size > self.expected_content_length:
            raise RuntimeError("Response content longer than Content-Length")
        self.expected_content_length -= size
        self.transport.write(head + body)
        if not message.get("more_body", False):
            if self.expected_content_length != 0:
                raise RuntimeError("Response content shorter than Content-Length")
            self.response_complete = True
            self.message_event.set()
            if not self.keep_alive:
                self.transport.close()
            self.on_response()


class DirectApp(Protocol):
    """What an ASGI app offers for the routes it answers directly (see the module's docstring).

    The app is found as the ``direct`` attribute of the application uvicorn serves."""

    def match(self, scope: dict[str, Any]) -> Any | None:
        """The route of a request (its scope's method and path are set), or None when it is
        not one of the direct routes."""

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any, route: Any) -> None:
        """Serve the request as the ASGI app would, ``route`` being what :meth:`match` gave."""


class _NoEvent:
    """What uvicorn's protocol sets when a connection is lost (a direct request wakes its
    waiter itself)."""

    __slots__ = ()

    def set(self) -> None:
        pass


_NO_EVENT = _NoEvent()
_INTERNAL_ERROR = b"Internal Server Error"
_INTERNAL_ERROR_HEADERS = (
    (b"content-type", b"text/plain; charset=utf-8"),
    (b"content-length", b"%d" % len(_INTERNAL_ERROR)),
)
_FRAMING = (b"content-length", b"transfer-encoding", b"connection")


class Direct:
    """One request of a direct route: the protocol buffers its body and the app answers it.

    To the app it is ASGI: ``receive`` gives the whole body at once (then waits for the
    disconnect), and the object itself is the ``send`` callable, which holds the response's
    start and writes the whole response with its body (a streamed body is gathered first). The
    prediction path answers with :meth:`respond` instead. The protocol reads and sets the
    attributes uvicorn's cycle has for it: ``response_complete``, ``disconnected``,
    ``keep_alive``, ``message_event``.
    """

    __slots__ = (
        "_chunks",
        "_parts",
        "_received",
        "_start",
        "_waiter",
        "disconnected",
        "keep_alive",
        "previous",
        "protocol",
        "response_complete",
        "route",
        "scope",
    )

    message_event = _NO_EVENT

    def __init__(
        self,
        protocol: HttpProtocol,
        scope: dict[str, Any],
        route: Any,
        keep_alive: bool,
        previous: Any,
    ) -> None:
        self.protocol = protocol
        self.scope = scope
        self.route = route
        self.keep_alive = keep_alive
        self.previous = previous  # the connection's request before it, while it is answered
        self.response_complete = False
        self.disconnected = False
        self._chunks: list[bytes] = []
        self._received = False
        self._start: dict[str, Any] | None = None
        self._parts: list[bytes] = []
        self._waiter: asyncio.Future[None] | None = None

    # --- the protocol's side
    def body_received(self) -> None:
        """The whole body is in: start the app, or queue behind the request before it."""
        previous, self.previous = self.previous, None
        protocol = self.protocol
        if previous is None or previous.response_complete:
            protocol.start_direct(self)
        else:  # pipelined: answered in order
            protocol.flow.pause_reading()
            protocol.pipeline.appendleft((self, None))  # type: ignore[arg-type]

    def gone(self) -> bool:
        """Whether the client has gone (its connection was lost before the answer)."""
        return self.disconnected

    def lost(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def ended(self, task: asyncio.Task[None]) -> None:
        """The app's task ended: as with uvicorn's cycle, a failure is logged, a request left
        unanswered gets a 500 and a response left half-sent closes the connection."""
        protocol = self.protocol
        protocol.tasks.discard(task)
        if self.response_complete:
            return
        cancelled = task.cancelled()
        error = None if cancelled else task.exception()
        if error is not None:
            protocol.logger.error("Exception in ASGI application\n", exc_info=error)
        elif not cancelled:
            protocol.logger.error("ASGI callable returned without completing response.")
        if self.disconnected:
            return
        if self._start is None and not cancelled:
            self.keep_alive = False
            self.respond(500, list(_INTERNAL_ERROR_HEADERS), _INTERNAL_ERROR)
        else:
            protocol.transport.close()

    # --- the app's side
    async def receive(self) -> dict[str, Any]:
        if not self._received:
            self._received = True
            chunks = self._chunks
            body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            self._chunks = []
            return {"type": "http.request", "body": body, "more_body": False}
        if not self.disconnected and not self.response_complete:
            waiter = self._waiter
            if waiter is None:
                waiter = self._waiter = self.protocol.loop.create_future()
            await waiter
        return {"type": "http.disconnect"}

    async def __call__(self, message: Any) -> None:
        """ASGI's ``send``."""
        kind = message["type"]
        if kind == "http.response.start":
            if self._start is not None or self.response_complete:
                raise RuntimeError("Unexpected ASGI message 'http.response.start' sent.")
            headers = [(name.lower(), value) for name, value in message.get("headers", ())]
            _check_fields([name for name, _ in headers], [value for _, value in headers])
            # The length is the gathered body's; the connection's framing is the protocol's.
            headers = [pair for pair in headers if pair[0] not in _FRAMING]
            self._start = {"status": message["status"], "headers": headers}
            return
        if kind != "http.response.body":
            raise RuntimeError(f"Unexpected ASGI message '{kind}' sent.")
        start = self._start
        if start is None or self.response_complete:
            raise RuntimeError("Unexpected ASGI message 'http.response.body' sent.")
        body = message.get("body", b"")
        if message.get("more_body", False):
            self._parts.append(body)
            return
        if self._parts:
            body = b"".join([*self._parts, body])
            self._parts = []
        headers = start["headers"]
        headers.append((b"content-length", b"%d" % len(body)))
        self.respond(start["status"], headers, body)

    def respond(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """Write the whole response: ``headers`` are lower-case names with safe values (the
        app's own: no line breaks) and include ``content-length``."""
        if self.response_complete:
            raise RuntimeError("Unexpected response: the request was answered already.")
        self.response_complete = True
        if self._waiter is not None:  # a receive() waiting for the disconnect returns
            self.lost()
        if self.disconnected:
            return
        protocol = self.protocol
        parts = [STATUS_LINE[status], _default_headers(protocol.server_state.default_headers)]
        for pair in headers:
            parts.append(b"%s: %s\r\n" % pair)
        parts.append(b"\r\n" if self.keep_alive else b"connection: close\r\n\r\n")
        parts.append(body)
        transport = protocol.transport
        transport.write(b"".join(parts))
        if not self.keep_alive:
            transport.close()
        protocol.on_response_complete()


def _small_body(headers: list[tuple[bytes, bytes]]) -> bool:
    """Whether a request's header fields announce a body of at most :data:`DIRECT_MAX_BODY`
    bytes by ``content-length`` (not chunked)."""
    length = None
    for name, value in headers:
        if name == b"content-length":
            length = value
        elif name == b"transfer-encoding":
            return False
    return length is not None and length.isdigit() and int(length) <= DIRECT_MAX_BODY


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with :class:`_Cycle`, :class:`Direct` requests and a lazy
    keep-alive timer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's access lines only where its logger would write them (inferd disables it
        # and writes its own): a response that is logged takes uvicorn's own path.
        self.access_log = self.access_log and self.access_logger.isEnabledFor(logging.INFO)
        self._idle_since: float | None = None  # None: a request is being read or answered
        self.direct: DirectApp | None = getattr(self.app, "direct", None)

    # The keep-alive timer: armed once per idle spell, checked when it fires.
    def _unset_keepalive_if_required(self) -> None:
        self._idle_since = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        cycle: Any = self.cycle
        if type(cycle) is Direct:
            cycle.lost()
        if self.timeout_keep_alive_task is not None:
            self.timeout_keep_alive_task.cancel()
            self.timeout_keep_alive_task = None

    def on_response_complete(self) -> None:
        self.server_state.total_requests += 1
        if self.transport.is_closing():
            return
        self.flow.resume_reading()
        if self.pipeline:
            self._idle_since = None
            cycle, app = self.pipeline.pop()
            self._start_asgi_task(cycle, app)
            return
        self._idle_since = self.loop.time()
        if self.timeout_keep_alive_task is None:
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self._keep_alive_expired
            )

    def _keep_alive_expired(self) -> None:
        self.timeout_keep_alive_task = None
        idle_since = self._idle_since
        if idle_since is None:  # busy: the response that ends it arms the timer again
            return
        left = idle_since + self.timeout_keep_alive - self.loop.time()
        if left > 0:
            self.timeout_keep_alive_task = self.loop.call_later(left, self._keep_alive_expired)
        else:
            self.timeout_keep_alive_handler()

    def on_headers_complete(self) -> None:
        # uvicorn's, building a _Cycle (and its pipelining, upgrade and concurrency limit).
        parser = self.parser
        http_version = parser.get_http_version()
        scope: Any = self.scope
        scope["method"] = parser.get_method().decode("ascii")
        if http_version != "1.1":
            scope["http_version"] = http_version
        if parser.should_upgrade() and self._should_upgrade():
            return
        parsed_url = httptools.parse_url(self.url)
        raw_path = parsed_url.path
        path = raw_path.decode("ascii")
        if "%" in path:
            path = urllib.parse.unquote(path)
        scope["path"] = self.root_path + path
        scope["raw_path"] = self.root_path.encode("ascii") + raw_path
        scope["query_string"] = parsed_url.query or b""
        if self.limit_concurrency is not None and (
            len(self.connections) >= self.limit_concurrency
            or len(self.tasks) >= self.limit_concurrency
        ):
            app = service_unavailable
            self.logger.warning("Exceeded concurrency limit.")
        else:
            app = self.app
        existing = self.cycle
        direct = self.direct
        if (
            direct is not None
            and app is self.app
            and not self.expect_100_continue
            and (route := direct.match(scope)) is not None
            and _small_body(self.headers)
        ):
            keep_alive = http_version != "1.0" and parser.should_keep_alive()
            previous = None if existing is None or existing.response_complete else existing
            self.cycle = Direct(self, scope, route, keep_alive, previous)  # type: ignore[assignment]
            return
        self.cycle = _Cycle(
            scope=scope,
            transport=self.transport,
            flow=self.flow,
            logger=self.logger,
            access_logger=self.access_logger,
            access_log=self.access_log,
            default_headers=self.server_state.default_headers,
            message_event=asyncio.Event(),
            expect_100_continue=self.expect_100_continue,
            keep_alive=http_version != "1.0" and parser.should_keep_alive(),
            on_response=self.on_response_complete,
        )
        if existing is None or existing.response_complete:
            self._start_asgi_task(self.cycle, app)
        else:  # pipelined: answered in order
            self.flow.pause_reading()
            self.pipeline.appendleft((self.cycle, app))

    # Direct requests (see the module's docstring).
    def on_body(self, body: bytes) -> None:
        cycle: Any = self.cycle
        if type(cycle) is Direct:
            cycle._chunks.append(body)
            return
        super().on_body(body)

    def on_message_complete(self) -> None:
        cycle: Any = self.cycle
        if type(cycle) is Direct:
            cycle.body_received()
            return
        super().on_message_complete()

    def start_direct(self, cycle: Direct) -> None:
        assert self.direct is not None
        task = self.loop.create_task(self.direct(cycle.scope, cycle.receive, cycle, cycle.route))
        task.add_done_callback(cycle.ended)
        self.tasks.add(task)

    def _start_asgi_task(self, cycle: Any, app: Any) -> None:
        if type(cycle) is Direct:  # a pipelined direct request's turn
            self.start_direct(cycle)
            return
        super()._start_asgi_task(cycle, app)
