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
"""

from __future__ import annotations

import asyncio
import logging
import urllib.parse
from typing import Any

import httptools
from uvicorn.protocols.http.flow_control import service_unavailable
from uvicorn.protocols.http.httptools_impl import (
    HEADER_RE,
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

__all__ = ["HttpProtocol"]

_rendered: tuple[object, bytes] = (None, b"")  # the server's default headers, as bytes


def _default_headers(headers: list[tuple[bytes, bytes]]) -> bytes:
    """``headers`` (uvicorn's ``date`` and configured headers, a list replaced every second)
    rendered once per list."""
    global _rendered
    if _rendered[0] is not headers:
        _rendered = (headers, b"".join(b"%s: %s\r\n" % pair for pair in headers))
    return _rendered[1]


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
        if HEADER_RE.search(b"-".join(names)):
            raise RuntimeError("Invalid HTTP header name.")
        values = [value for _, value in headers]
        if HEADER_VALUE_RE.search(b"\t".join(values)):
            raise RuntimeError("Invalid HTTP header value.")
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


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with :class:`_Cycle` and a lazy keep-alive timer."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # uvicorn's access lines only where its logger would write them (inferd disables it
        # and writes its own): a response that is logged takes uvicorn's own path.
        self.access_log = self.access_log and self.access_logger.isEnabledFor(logging.INFO)
        self._idle_since: float | None = None  # None: a request is being read or answered

    # The keep-alive timer: armed once per idle spell, checked when it fires.
    def _unset_keepalive_if_required(self) -> None:
        self._idle_since = None

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
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
        scope = self.scope
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
