"""HTTP routes of the console: its static files under ``/console/`` and ``GET /v1/stats``.

The page is plain HTML, CSS and JavaScript shipped inside the package (no build step, nothing
fetched from another origin). The files are read once when the app is built and served from
memory with an ETag, so an upgrade is picked up on the next page load. A strict
Content-Security-Policy keeps the page to this origin: scripts, styles and API calls alike.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from importlib import resources

import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import RedirectResponse, Response

from inferd.console.stats import DEFAULT_WINDOW, MAX_WINDOW, Stats
from inferd.errors import NotFound

__all__ = ["Asset", "build_console_router", "load_assets"]

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
}
_HEADERS = {
    "cache-control": "no-cache",
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
        "connect-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; "
        "form-action 'self'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
}


@dataclass(frozen=True, slots=True)
class Asset:
    """One static file of the console, held in memory."""

    body: bytes
    media_type: str
    etag: str


def load_assets() -> dict[str, Asset]:
    """The console's files by name, read from the package (a wheel, a zip or a checkout)."""
    assets: dict[str, Asset] = {}
    for item in (resources.files("inferd.console") / "static").iterdir():
        suffix = "." + item.name.rsplit(".", 1)[-1] if "." in item.name else ""
        if not item.is_file() or suffix not in _TYPES:
            continue
        body = item.read_bytes()
        etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
        assets[item.name] = Asset(body, _TYPES[suffix], etag)
    return assets


def build_console_router(stats: Stats, assets: dict[str, Asset] | None = None) -> APIRouter:
    """``/console`` (the page) and ``/v1/stats`` (what its live view polls)."""
    files = assets if assets is not None else load_assets()
    router = APIRouter()

    def serve(name: str, request: Request) -> Response:
        asset = files.get(name)
        if asset is None:
            raise NotFound(f"/console/{name}: no such console file")
        headers = {**_HEADERS, "etag": asset.etag}
        if request.headers.get("if-none-match") == asset.etag:
            return Response(status_code=304, headers=headers)
        return Response(asset.body, media_type=asset.media_type, headers=headers)

    @router.api_route("/console", methods=["GET", "HEAD"], include_in_schema=False)
    async def console_root() -> Response:
        # Relative, so that the page also works behind a proxy that adds a path prefix.
        return RedirectResponse("console/", status_code=308)

    @router.api_route("/console/", methods=["GET", "HEAD"], include_in_schema=False)
    async def console_index(request: Request) -> Response:
        return serve("index.html", request)

    @router.api_route("/console/{name}", methods=["GET", "HEAD"], include_in_schema=False)
    async def console_file(name: str, request: Request) -> Response:
        return serve(name, request)

    @router.get(
        "/v1/stats",
        tags=["observability"],
        summary="Live figures from this process's metrics: rates, p50/p95/p99, batches, queues",
    )
    async def live_stats(
        window: float = Query(
            default=DEFAULT_WINDOW,
            description=f"seconds to look back, 1 to {MAX_WINDOW:g}",
        ),
    ) -> Response:
        return Response(orjson.dumps(stats.summary(window)), media_type="application/json")

    return router
