"""Rendering of JSON bodies and errors at the ASGI level (no framework on the hot path)."""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

import orjson

from inferd.errors import InferdError, MethodNotAllowed
from inferd.http.protocol import Direct

__all__ = [
    "documented_methods",
    "error_body",
    "method_not_allowed",
    "send_answer",
    "send_error",
    "send_json",
]

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


async def send_answer(
    send: Send, ctx: Any, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> None:
    """Send a lean route's answer: ``headers`` (its type, and any of its error's), then the
    length, the request's rate-limit fields (but on a 429, which has its own) and its id;
    ``ctx`` (the request's :class:`~inferd.serving.RequestContext`) records the status."""
    headers.append((b"content-length", b"%d" % len(body)))
    if status != 429 and (ctx.rate is not None or ctx.quota is not None):
        headers.extend(ctx.rate_limit_headers())
    headers.append((b"x-request-id", ctx.request_id.encode()))
    ctx.status = status
    if type(send) is Direct:  # the connection's own request: written in one call
        send.respond(status, headers, body)
        return
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Send, error: InferdError) -> None:
    extra = [(k.encode(), v.encode()) for k, v in error.headers().items()]
    await send_json(send, error.status_code, error_body(error), extra)


def method_not_allowed(routes: Iterable[Any], method: str, path: str) -> MethodNotAllowed | None:
    """A 405 naming the methods that ``path`` has among ``routes`` (documented routes only:
    not a catch-all), or None when no route has that path."""
    allow: set[str] = set()
    for route in routes:
        regex, methods = getattr(route, "path_regex", None), getattr(route, "methods", None)
        if not getattr(route, "include_in_schema", False) or regex is None or not methods:
            continue
        if regex.match(path):
            allow.update(methods)
    if not allow or method in allow:
        return None
    return MethodNotAllowed(
        f"{method} {path}: the path has {', '.join(sorted(allow))}", sorted(allow)
    )


def documented_methods(document: dict[str, Any], path: str) -> list[str]:
    """The methods an OpenAPI ``document`` gives ``path`` (matched against its templates)."""
    allow: set[str] = set()
    for template, operations in document.get("paths", {}).items():
        pattern = re.sub(r"\\\{\w+\\\}", "[^/]+", re.escape(template))
        if re.fullmatch(pattern, path):
            allow.update(m.upper() for m in operations if not m.startswith("x-"))
    return sorted(allow)
