"""Cross-Origin Resource Sharing for browsers (``cors_origins``), around the whole app.

Starlette's ``CORSMiddleware`` wraps every route, the plain-ASGI prediction routes of
:mod:`inferd.http.hotpath` included: it answers preflight (``OPTIONS`` with
``Access-Control-Request-Method``) itself, before authentication, and adds the
``Access-Control-*`` fields to the answers of allowed origins.
"""

from __future__ import annotations

from typing import Any

from starlette.middleware.cors import CORSMiddleware

__all__ = ["ALLOWED_HEADERS", "EXPOSED_HEADERS", "cors"]

ALLOWED_HEADERS = [
    "Authorization",
    "Content-Type",
    "Idempotency-Key",
    "Last-Event-ID",
    "X-API-Key",
    "X-Inferd-Variant",
    "X-Request-ID",
    "X-Request-Timeout-Ms",
]
"""Request header fields a page may send (the simple ones are always allowed)."""

EXPOSED_HEADERS = [
    "X-Request-ID",
    "RateLimit",
    "RateLimit-Policy",
    "Retry-After",
    "Location",
]
"""Response header fields a page's script may read."""


def cors(app: Any, origins: list[str]) -> Any:
    """``app`` answering cross-origin calls from ``origins`` (``*`` for any)."""
    return CORSMiddleware(
        app,
        allow_origins=origins,
        allow_methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE"],
        allow_headers=ALLOWED_HEADERS,
        expose_headers=EXPOSED_HEADERS,
        allow_credentials=False,
        max_age=600,
    )
