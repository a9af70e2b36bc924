"""Long-running requests over WebSocket: follow one, or submit one and follow it.

``/v1/requests/{id}/ws`` sends the events of the SSE stream (``/v1/requests/{id}/events``),
one JSON text message each: ``{"seq": 3, "event": "response", "data": {...}}`` (``seq`` is the
SSE ``id:``). It starts after ``?after=N`` (the SSE ``Last-Event-ID``) and closes with 1000
after the terminal event (``done`` or ``error``). ``/v1/requests/ws`` takes the body of
``POST /v1/requests`` as its first message, answers ``{"event": "accepted", "data": {...}}``
(the 202 body) and then follows that request the same way.

Keys: ``Authorization: Bearer <key>`` or ``X-API-Key`` on the upgrade request, as on every
HTTP route; a client that cannot set headers (a browser) sends ``{"api_key": "<key>", ...}`` as
its first message instead (on the submit socket, next to the body's fields). Scope
``requests``; a caller sees only its own requests. A refusal is the HTTP error body as one
message, ``{"error": {"code", "message", "retryable"}}``, then a close with code 4000 + the
HTTP status (4400, 4401, 4403, 4404, 4422, 4429, 4503, ...) and the message as the reason;
an unexpected failure closes with 1011.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from fastapi import APIRouter, WebSocket
from starlette.websockets import WebSocketDisconnect

from inferd.errors import BadRequest, InferdError, PayloadTooLarge
from inferd.http.requests_api import submit_answer
from inferd.http.responses import error_body
from inferd.http.sse import parse_last_event_id
from inferd.jobs.service import RequestService
from inferd.jobs.types import Event
from inferd.logs import get_logger
from inferd.tenancy.auth import Authenticator, required_scope
from inferd.tenancy.enforce import Enforcer
from inferd.tenancy.keys import ApiKey, Unauthorized

__all__ = ["FIRST_MESSAGE_SECONDS", "build_requests_ws_router", "close_code"]

log = get_logger("inferd.http.ws")

FIRST_MESSAGE_SECONDS = 10.0
"""How long a socket waits for the first message (a key, or the submit body)."""
_MAX_REASON = 123  # bytes of a close frame's reason (RFC 6455)


def close_code(error: InferdError) -> int:
    """The close code of a refusal: 4000 + the HTTP status the same error gets."""
    return 4000 + error.status_code


def _reason(text: str) -> str:
    raw = text.encode()
    if len(raw) <= _MAX_REASON:
        return text
    return raw[: _MAX_REASON - 3].decode(errors="ignore") + "..."


def event_message(event: Event) -> bytes:
    """One event as a message: the SSE frame's id, event and data as JSON."""
    return orjson.dumps({"seq": event.seq, "event": event.kind.value, "data": event.data})


class _Socket:
    """One accepted socket of the requests API: refusals, the first message, the stream."""

    def __init__(self, ws: WebSocket, max_message: int) -> None:
        self.ws = ws
        self.max_message = max_message
        self.code: int | None = None  # how it closed: the log line says
        self.sent = 0
        self.user: str | None = None
        self.detail: str | None = None
        self.started = time.perf_counter()

    def log(self) -> None:
        """One line per socket, like the access log's per request."""
        log.info(
            "websocket",
            path=self.ws.url.path,
            user=self.user,
            close_code=self.code if self.code is not None else 1006,  # 1006: the client left
            events=self.sent,
            detail=self.detail,
            duration_ms=round((time.perf_counter() - self.started) * 1000.0, 3),
        )

    async def refuse(self, error: InferdError) -> None:
        """The error body as a message, then a close with 4000 + status and the message."""
        with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
            await self.ws.send_text(error_body(error).decode())
            self.code, self.detail = close_code(error), error.message
            await self.ws.close(self.code, _reason(error.message))

    async def first_message(self) -> dict[str, Any]:
        """The client's first message, a JSON object; :class:`BadRequest` otherwise."""
        try:
            message = await asyncio.wait_for(self.ws.receive(), FIRST_MESSAGE_SECONDS)
        except TimeoutError:
            raise BadRequest(
                f"no first message within {FIRST_MESSAGE_SECONDS:g} s (see docs/protocols.md)"
            ) from None
        if message["type"] == "websocket.disconnect":
            raise WebSocketDisconnect(message.get("code", 1000))
        raw = message.get("text")
        if raw is None:
            raw = message.get("bytes") or b""
        if len(raw) > self.max_message:
            raise PayloadTooLarge(f"the first message is over {self.max_message} bytes")
        try:
            doc = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"the first message is not valid JSON: {exc}") from None
        if not isinstance(doc, dict):
            raise BadRequest("the first message must be a JSON object")
        return doc

    async def stream(self, events: AsyncIterator[Event | None]) -> None:
        """Send ``events`` until the terminal one, then close with 1000. Stops early (and
        quietly) when the client goes."""

        async def pump() -> None:
            try:
                async for event in events:
                    if event is not None:  # keep-alive: the protocol's pings do that
                        await self.ws.send_text(event_message(event).decode())
                        self.sent += 1
            finally:
                aclose = getattr(events, "aclose", None)
                if aclose is not None:
                    await aclose()

        async def drain() -> None:  # client messages are not used after the first; a close is
            while True:
                message = await self.ws.receive()
                if message["type"] == "websocket.disconnect":
                    return

        sender = asyncio.ensure_future(pump())
        reader = asyncio.ensure_future(drain())
        try:
            await asyncio.wait({sender, reader}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (sender, reader):
                task.cancel()
            await asyncio.gather(sender, reader, return_exceptions=True)
        if reader.done() and not reader.cancelled() and reader.exception() is None:
            return  # the client closed first
        error = sender.exception() if not sender.cancelled() else None
        if error is None:
            with contextlib.suppress(WebSocketDisconnect, RuntimeError, OSError):
                self.code = 1000
                await self.ws.close(1000)
        elif isinstance(error, InferdError):
            await self.refuse(error)
        elif not isinstance(error, WebSocketDisconnect | OSError):
            self.code, self.detail = 1011, f"unhandled {type(error).__name__}"
            raise error


class _Gate:
    """Keys and scopes of the sockets, as the HTTP middleware checks them."""

    def __init__(self, auth: Authenticator | None, enforcer: Enforcer | None) -> None:
        self.auth = auth
        self.enforcer = enforcer

    def needs_message(self, ws: WebSocket) -> bool:
        """Whether the key must come in the first message (none on the upgrade)."""
        if self.auth is None:
            return False
        try:
            self.auth.cached(ws.scope["headers"])
        except Unauthorized:
            return True
        return False

    async def admit(self, ws: WebSocket, key_text: Any = None) -> tuple[str, ApiKey | None]:
        """The caller's user and key, after checking the key: from the upgrade's headers, or
        ``key_text`` (the first message's ``api_key``) when those have none."""
        auth = self.auth
        if auth is None:
            return "anonymous", None
        headers = ws.scope["headers"]
        if key_text is not None and self.needs_message(ws):
            if not isinstance(key_text, str) or not key_text.isascii():
                raise Unauthorized("a valid API key is required (api_key: a string)")
            headers = [(b"authorization", b"Bearer " + key_text.encode())]
        elif self.needs_message(ws):
            raise Unauthorized(
                "a valid API key is required (Authorization: Bearer <key> on the upgrade, or "
                '{"api_key": "<key>"} as the first message)'
            )
        key = auth.cached(headers) or await auth.authenticate(headers)
        needed = required_scope("GET", ws.scope["path"]) or ""
        auth.authorize(key, needed)
        if self.enforcer is not None and needed:
            await self.enforcer.admit(key)
        return key.user, key


def build_requests_ws_router(
    service: RequestService,
    auth: Authenticator | None,
    enforcer: Enforcer | None,
    max_message: int = 1 << 20,
) -> APIRouter:
    """``/v1/requests/{id}/ws`` and ``/v1/requests/ws`` (see the module's docstring);
    ``max_message``: the most bytes a client's message may have (``max_body_bytes``)."""
    router = APIRouter(prefix="/v1/requests")
    gate = _Gate(auth, enforcer)

    @router.websocket("/ws")
    async def submit_ws(ws: WebSocket) -> None:
        await ws.accept()
        sock = _Socket(ws, max_message)
        try:
            events = await submit(sock)
            if events is not None:
                await sock.stream(events)
        finally:
            sock.log()

    async def submit(sock: _Socket) -> AsyncIterator[Event | None] | None:
        ws = sock.ws
        try:
            body = await sock.first_message()
            key_text = body.pop("api_key", None)
            idempotency_key = body.pop("idempotency_key", None)
            if idempotency_key is None:
                idempotency_key = ws.headers.get("idempotency-key")
            elif not isinstance(idempotency_key, str):
                raise BadRequest("idempotency_key must be a string")
            user, key = await gate.admit(ws, key_text)
            sock.user = user
            record, created = await service.submit(user, body, idempotency_key, key)
            accepted = submit_answer(record, created)
            await ws.send_text(orjson.dumps({"event": "accepted", "data": accepted}).decode())
            return await service.follow(user, record.id, 0)
        except WebSocketDisconnect:
            return None
        except InferdError as error:
            await sock.refuse(error)
            return None

    @router.websocket("/{request_id}/ws")
    async def follow_ws(ws: WebSocket, request_id: str) -> None:
        await ws.accept()
        sock = _Socket(ws, max_message)
        try:
            events = await follow(sock, request_id)
            if events is not None:
                await sock.stream(events)
        finally:
            sock.log()

    async def follow(sock: _Socket, request_id: str) -> AsyncIterator[Event | None] | None:
        ws = sock.ws
        try:
            key_text, after = None, ws.query_params.get("after")
            if gate.needs_message(ws):
                first = await sock.first_message()
                key_text = first.get("api_key")
                if first.get("after") is not None:
                    after = str(first["after"])
            user, _ = await gate.admit(ws, key_text)
            sock.user = user
            return await service.follow(user, request_id, _after(after))
        except WebSocketDisconnect:
            return None
        except InferdError as error:
            await sock.refuse(error)
            return None

    return router


def _after(value: str | None) -> int:
    try:
        return parse_last_event_id(value)
    except BadRequest:
        raise BadRequest(
            f"after must be a non-negative integer (a seq), got {(value or '')[:40]!r}"
        ) from None
