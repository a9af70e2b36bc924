"""HTTP routes of long-running requests: submit, read, list, cancel, follow over SSE."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import orjson
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import Response, StreamingResponse
from pydantic import BaseModel, Field

from inferd.errors import BadRequest, UnsupportedMediaType
from inferd.http import sse
from inferd.http.body import check_length, read_body
from inferd.jobs.service import RequestService
from inferd.jobs.types import RequestRecord

__all__ = ["build_requests_router", "record_json", "request_user", "submit_answer"]


class SubmitBody(BaseModel):
    """``POST /v1/requests``."""

    model: str = Field(examples=["iris"])
    """A served model's name."""
    input: Any = Field(examples=[{"features": [5.1, 3.5, 1.4, 0.2]}])
    """The model's input: ``{"features": [...]}`` for tabular models, a string for text."""
    parameters: dict[str, Any] | None = Field(default=None, examples=[{"max_new_tokens": 32}])


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


def _json(doc: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(orjson.dumps(doc), status, headers, media_type="application/json")


def build_requests_router(
    service: RequestService, max_body_bytes: int, sse_retry_ms: int = 1000
) -> APIRouter:
    router = APIRouter(prefix="/v1/requests", tags=["requests"])

    @router.post(
        "",
        status_code=202,
        summary="Submit a long-running request; follow it at events_url",
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
        content_type = request.headers.get("content-type", "")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise UnsupportedMediaType("Content-Type must be application/json")
        check_length(request.headers.get("content-length"), max_body_bytes)
        body = await read_body(request.receive, max_body_bytes)
        try:
            doc = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            raise BadRequest(f"request body is not valid JSON: {exc}") from None
        record, created = await service.submit(
            request_user(request), doc, idempotency_key, request.scope.get("inferd.key")
        )
        headers = {"location": f"/v1/requests/{record.id}"}
        if not created:
            headers["idempotent-replayed"] = "true"
        return _json(
            {
                "id": record.id,
                "status": record.status.value,
                "created_at": _iso(record.created_at),
                "events_url": f"/v1/requests/{record.id}/events",
            },
            202,
            headers,
        )

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

    @router.get("/{request_id}", summary="One request with its stored responses")
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
