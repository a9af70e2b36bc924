"""HTTP routes of long-running requests: submit, read, list, cancel, follow over SSE; and the
admin's dead letters (list, requeue) under ``/v1/admin/requests``."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from fastapi import APIRouter, Body, Header, Query, Request
from fastapi.responses import Response, StreamingResponse

from inferd.errors import BadRequest, InferdError, UnsupportedMediaType
from inferd.http import sse
from inferd.http.body import check_length, read_body, whole_body
from inferd.http.responses import error_body, send_answer
from inferd.http.schemas import (
    DeadLetterPage,
    ErrorBody,
    RequestAccepted,
    RequestDoc,
    RequeueBody,
    SubmitBody,
)
from inferd.jobs.service import RequestService
from inferd.jobs.types import RequestRecord, RequestStatus

__all__ = [
    "build_dead_letter_router",
    "build_requests_router",
    "record_json",
    "request_user",
    "submit_answer",
]

_SUBMIT_ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        404: "Unknown model",
        409: "Idempotency-Key reused with another body",
        422: "Bad input, parameters, ttl_seconds or expires_at",
        429: "Rate or budget spent, or the key's queued requests at their bound; Retry-After",
        503: "The model's queue is full (max_queued_requests); nothing stored; Retry-After",
    }.items()
}


def request_user(request: Request) -> str:
    """The caller's identity (``anonymous`` while authentication is off)."""
    user = request.scope.get("inferd.user")
    return user if isinstance(user, str) else "anonymous"


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None


def record_json(record: RequestRecord, with_input: bool = True) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "id": record.id,
        "user": record.user,
        "model": record.model,
        "version": record.version,
        "status": record.status.value,
        "attempts": record.attempts,
        "max_attempts": record.max_attempts,
        "responses": record.responses,
        "result": record.result,
        "error": record.error,
        "cancel_requested": record.cancel_requested,
        "created_at": _iso(record.created_at),
        "updated_at": _iso(record.updated_at),
        "started_at": _iso(record.started_at),
        "finished_at": _iso(record.finished_at),
        "expires_at": _iso(record.expires_at),
        "deduplicated": record.deduplicated,
        "deduplicated_from": record.deduplicated_from,
        "events_url": f"/v1/requests/{record.id}/events",
    }
    if with_input:
        doc["input"] = record.input
        doc["parameters"] = record.parameters
    return doc


def submit_answer(record: RequestRecord, created: bool) -> dict[str, Any]:
    """What a submit answers (the 202 body); ``replayed`` for an idempotent replay."""
    doc: dict[str, Any] = {
        "id": record.id,
        "status": record.status.value,
        "created_at": _iso(record.created_at),
        "events_url": f"/v1/requests/{record.id}/events",
    }
    if not created:
        doc["replayed"] = True
    return doc


class LeanSubmit:
    """``POST /v1/requests`` at the ASGI level, without the framework's routing, request
    object and dependencies (a third of a submit's CPU in the API, measured with py-spy): the
    hot path (:mod:`inferd.http.hotpath`) serves it; the FastAPI route documents it."""

    path = "/v1/requests"
    attach_trace = True  # the submit stores the request's trace context for its worker

    def __init__(self, service: RequestService, max_body_bytes: int) -> None:
        self.service = service
        self.max_body = max_body_bytes

    async def serve(self, scope: dict[str, Any], receive: Any, send: Any, ctx: Any) -> None:
        """Answer the submit (202, or the error's status) through ``send``."""
        status, headers, body = await self.answer(scope, receive, ctx)
        await send_answer(send, ctx, status, headers, body)

    async def answer(
        self, scope: dict[str, Any], receive: Any, ctx: Any = None
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        try:
            return await self._accept(scope, receive)
        except InferdError as error:
            if ctx is not None:
                ctx.detail = error.message
            headers = [_JSON, *((k.encode(), v.encode()) for k, v in error.headers().items())]
            return error.status_code, headers, error_body(error)

    async def _accept(
        self, scope: dict[str, Any], receive: Any
    ) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        content_type = b""
        length = idempotency_key = None
        for key, value in scope["headers"]:
            if key == b"content-type":
                content_type = value
            elif key == b"content-length":
                length = value
            elif key == b"idempotency-key":
                idempotency_key = value.decode("latin-1")
        if content_type.split(b";")[0].strip().lower() != b"application/json":
            raise UnsupportedMediaType("Content-Type must be application/json")
        check_length(length, self.max_body)
        first = await receive()
        body = whole_body(first, self.max_body)
        if body is None:
            body = await read_body(receive, self.max_body, first)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from None
        user = scope.get("inferd.user")
        record, created = await self.service.submit(
            user if isinstance(user, str) else "anonymous",
            doc,
            idempotency_key,
            scope.get("inferd.key"),
        )
        headers = [_JSON, (b"location", f"/v1/requests/{record.id}".encode())]
        if not created:
            headers.append((b"idempotent-replayed", b"true"))
        accepted = {
            "id": record.id,
            "status": record.status.value,
            "created_at": _iso(record.created_at),
            "events_url": f"/v1/requests/{record.id}/events",
            "expires_at": _iso(record.expires_at),
            "deduplicated": record.deduplicated,
            "deduplicated_from": record.deduplicated_from,
        }
        if record.deduplicated and record.status is RequestStatus.SUCCEEDED:
            accepted["result"] = record.result
        return 202, headers, orjson.dumps(accepted)


_JSON = (b"content-type", b"application/json")


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status, headers, media_type="application/json")


def build_requests_router(
    service: RequestService, max_body_bytes: int, sse_retry_ms: int = 1000
) -> APIRouter:
    router = APIRouter(prefix="/v1/requests", tags=["requests"])
    lean = LeanSubmit(service, max_body_bytes)

    @router.post(
        "",
        status_code=202,
        summary="Submit a long-running request; follow it at events_url",
        response_model=RequestAccepted,
        responses=_SUBMIT_ERRORS,
        openapi_extra={
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": SubmitBody.model_json_schema()}},
            }
        },
    )
    async def submit(
        request: Request,
        idempotency_key: str | None = Header(default=None, alias="Idempotency-Key"),
    ) -> Response:
        # Served by LeanSubmit in front of FastAPI (inferd.http.hotpath); this route documents
        # it and answers only where no lean path is in front (an app built without one).
        status, headers, body = await lean.answer(dict(request.scope), request.receive)
        return Response(body, status, headers={k.decode(): v.decode() for k, v in headers})

    @router.get("", summary="The caller's requests, newest first, with cursor pagination")
    async def list_requests(
        request: Request,
        cursor: str | None = Query(default=None, description="next_cursor of the previous page"),
        limit: int = Query(default=20, description="1 to 100"),
    ) -> Response:
        if not 1 <= limit <= 100:
            raise BadRequest(f"limit must be between 1 and 100, got {limit}")
        page = await service.page(request_user(request), cursor, limit)
        return _json(
            {
                "requests": [record_json(r) for r in page.items],
                "next_cursor": page.next_cursor,
                "limit": limit,
            }
        )

    @router.get(
        "/{request_id}",
        summary="One request with its stored responses",
        response_model=RequestDoc,
    )
    async def get_request(request: Request, request_id: str) -> Response:
        return _json(record_json(await service.get(request_user(request), request_id)))

    @router.post("/{request_id}/cancel", status_code=202, summary="Cancel a request")
    async def cancel(request: Request, request_id: str) -> Response:
        record = await service.cancel(request_user(request), request_id)
        return _json(record_json(record), 202)

    @router.get(
        "/{request_id}/events",
        summary="Server-Sent Events: stored responses, then live ones, until done",
        response_class=StreamingResponse,
        responses={200: {"content": {"text/event-stream": {}}}},
    )
    async def events(
        request: Request,
        request_id: str,
        last_event_id: str | None = Header(default=None, alias="Last-Event-ID"),
    ) -> StreamingResponse:
        after = sse.parse_last_event_id(last_event_id)
        events = await service.follow(request_user(request), request_id, after)
        return StreamingResponse(
            sse.frames(events, sse_retry_ms),
            media_type="text/event-stream",
            headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
        )

    return router


_DEAD_LETTERS = [RequestStatus.DEAD, RequestStatus.FAILED, RequestStatus.EXPIRED]


def build_dead_letter_router(service: RequestService) -> APIRouter:
    """``/v1/admin/requests``: requests that ended without a result, of every user, and
    putting them back in the queue (the ``admin`` scope, like every ``/v1/admin`` route)."""
    router = APIRouter(prefix="/v1/admin/requests", tags=["admin"])

    @router.get(
        "",
        summary="Dead letters: dead (or failed, expired) requests of every user, newest first",
        response_model=DeadLetterPage,
    )
    async def dead_letters(
        status: list[str] | None = Query(
            default=None, description="dead (default), failed or expired; repeat for several"
        ),
        model: str | None = Query(default=None, description="only this model's"),
        cursor: str | None = Query(default=None, description="next_cursor of the previous page"),
        limit: int = Query(default=20, description="1 to 100"),
    ) -> Response:
        if not 1 <= limit <= 100:
            raise BadRequest(f"limit must be between 1 and 100, got {limit}")
        allowed = {s.value: s for s in _DEAD_LETTERS}
        wanted = status or ["dead"]
        unknown = [name for name in wanted if name not in allowed]
        if unknown:
            raise BadRequest(
                f"status {', '.join(map(repr, unknown))} is not a dead letter; "
                f"use {', '.join(allowed)}"
            )
        page = await service.dead_letters([allowed[n] for n in wanted], model, cursor, limit)
        return _json(
            {
                "requests": [record_json(r) for r in page.items],
                "next_cursor": page.next_cursor,
                "limit": limit,
            }
        )

    @router.post(
        "/{request_id}/requeue",
        summary="Queue a dead, failed or expired request again (same id, more attempts)",
        response_model=RequestDoc,
        responses={
            404: {"model": ErrorBody, "description": "No such request"},
            409: {"model": ErrorBody, "description": "It is not dead, failed or expired"},
        },
    )
    async def requeue(request_id: str, body: RequeueBody | None = Body(default=None)) -> Response:
        attempts = body.attempts if body is not None else None
        return _json(record_json(await service.requeue(request_id, attempts)))

    return router
