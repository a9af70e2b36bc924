"""Rendering of JSON bodies and errors at the ASGI level (no framework on the hot path)."""

from __future__ import annotations

from typing import Any

import orjson

from inferd.errors import InferdError

__all__ = ["error_body", "send_error", "send_json"]

_JSON = (b"content-type", b"application/json")

Send = Any


def error_body(error: InferdError) -> bytes:
    return orjson.dumps(
        {"error": {"code": error.code, "message": error.message, "retryable": error.retryable}}
    )


async def send_json(send: Send, status: int, body: bytes, extra: list[Any] | None = None) -> None:
    headers = [_JSON, (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: InferdError) -> None:
    extra = [(k.encode(), v.encode()) for k, v in error.headers().items()]
    await send_json(send, error.status_code, error_body(error), extra)
