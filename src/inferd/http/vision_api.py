"""Image classification routes: ``POST /v1/models/{name}/classify`` and ``POST /v1/predict``.

A request carries one picture: the raw bytes as the body (any ``Content-Type`` but multipart
and JSON; the format is read from the bytes), a ``multipart/form-data`` upload in a field
named ``file`` or ``image``, or ``{"url": "..."}`` when images by URL are allowed for that
host. Admission is the hot path's: unknown model 404, shedding 503 before the body is read,
a deadline (504), one token of the caller's daily budget per image. Decoding runs in a small
thread pool, the model in the batcher's threads; the event loop only parses and waits.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit

import httpx
import numpy as np
import orjson
from fastapi import APIRouter, Query, Request
from fastapi.responses import Response
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from inferd.errors import (
    BadRequest,
    DeadlineExceeded,
    InferdError,
    ModelNotFound,
    ValidationFailed,
)
from inferd.http.body import check_length, read_body
from inferd.http.context import disconnect_probe, request_timeout, watch_disconnect
from inferd.logs import get_logger
from inferd.metrics import Metrics
from inferd.models.images import ImageInput, Preprocessor
from inferd.models.registry import LoadedModel
from inferd.models.spec import ImageSpec
from inferd.serving import DataPlane, Decoded, RequestContext
from inferd.settings import Settings

__all__ = ["UrlNotAllowed", "VisionService", "build_vision_router"]

log = get_logger("inferd.vision")

_CLASSIFY_ENDPOINT = "/v1/models/{name}/classify"
_PREDICT_ENDPOINT = "/v1/predict"
_MULTIPART_OVERHEAD = 64 * 1024  # headers and boundaries around the file in a form upload
_MAX_JSON_BODY = 16 * 1024
_FIELDS = (b"file", b"image")
_DEFAULT_TOP_K = 5


class UrlNotAllowed(InferdError):
    """The request names an image by URL on a host that is not allowed."""

    status_code = 403
    code = "url_not_allowed"


class VisionService:
    """Reads, prepares and classifies one picture per request through the model's batcher."""

    def __init__(self, plane: DataPlane, settings: Settings, metrics: Metrics) -> None:
        self.plane = plane
        self.registry = plane.registry
        self.metrics = metrics
        self.default_model = settings.default_vision_model
        self.timeout = settings.image_request_timeout_ms / 1000.0
        self.allowed_hosts = frozenset(h.lower() for h in settings.image_url_allowed_hosts)
        self.url_timeout = settings.image_url_timeout_s
        self.debug = settings.log_level == "debug"
        self._threads = settings.image_decode_threads
        self._pool: ThreadPoolExecutor | None = None
        self._preprocessors: dict[int, tuple[LoadedModel, Preprocessor]] = {}

    # ------------------------------------------------------------------ lookups
    def default_name(self) -> str:
        """The image model ``POST /v1/predict`` serves."""
        return self.default_model or self._first_image_model()

    def _first_image_model(self) -> str:
        for loaded in self.registry.all():
            if loaded.spec.takes_images:
                return loaded.name
        raise ModelNotFound(
            "no image model is served here (set INFERD_DEFAULT_VISION_MODEL, or add a model "
            'with [input] type = "image")'
        )

    def preprocessor(self, loaded: LoadedModel) -> Preprocessor:
        cached = self._preprocessors.get(id(loaded))
        if cached is not None and cached[0] is loaded:
            return cached[1]
        pre = Preprocessor(loaded.spec.image)
        if len(self._preprocessors) > 256:  # versions come and go; forget old ones
            self._preprocessors.clear()
        self._preprocessors[id(loaded)] = (loaded, pre)
        return pre

    # ------------------------------------------------------------------ the request
    async def classify(self, request: Request, name: str | None, top_k: int | None) -> Response:
        ctx = request.scope.get("inferd")
        if not isinstance(ctx, RequestContext):
            loop_now = asyncio.get_running_loop().time()
            ctx = RequestContext("-", time.perf_counter(), loop_now)
        ctx.endpoint = _PREDICT_ENDPOINT if name is None else _CLASSIFY_ENDPOINT
        try:
            inbound = ImageInbound(self, ctx, request, name or self.default_name(), top_k)
            body = await self.plane.infer(inbound)
        except InferdError as error:
            ctx.detail = error.message
            if ctx.model is not None and ctx.version is not None:
                self.metrics.predictions.labels(ctx.model, ctx.version, error.code).inc()
            raise
        assert ctx.model is not None
        assert ctx.version is not None
        self.metrics.predictions.labels(ctx.model, ctx.version, "success").inc()
        return Response(body, media_type="application/json")

    async def _prepare(self, pre: Preprocessor, data: bytes, deadline: float) -> ImageInput:
        """Decode in the image threads, within what is left of the deadline."""
        loop = asyncio.get_running_loop()
        left = deadline - loop.time()
        if left <= 0:
            raise DeadlineExceeded("deadline exceeded before the image was decoded")
        if self._pool is None:
            self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix="inferd-image")
        try:
            return await asyncio.wait_for(loop.run_in_executor(self._pool, pre.prepare, data), left)
        except TimeoutError:
            raise DeadlineExceeded("deadline exceeded while the image was decoded") from None

    def close(self) -> None:
        """Stop the image threads (at shutdown)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None

    # ------------------------------------------------------------------ reading the picture
    async def _image_bytes(self, request: Request, pre: Preprocessor) -> bytes:
        content_type = request.headers.get("content-type", "")
        kind = content_type.split(";", 1)[0].strip().lower()
        if kind == "multipart/form-data":
            body = await _read(request, pre.spec.max_bytes + _MULTIPART_OVERHEAD)
            data = _multipart_file(body, content_type.encode("latin-1"))
        elif kind == "application/json":
            body = await _read(request, _MAX_JSON_BODY)
            data = await self._fetch(_json_url(body), pre)
        else:  # raw bytes, whatever the client called them: the bytes say what they are
            data = await _read(request, pre.spec.max_bytes)
        if not data:
            raise BadRequest(
                "no image in the request: send the image as the body, as a multipart field "
                'named file or image, or as {"url": ...}'
            )
        pre.check_size(len(data))
        return data

    async def _fetch(self, url: str, pre: Preprocessor) -> bytes:
        if not self.allowed_hosts:
            raise BadRequest(
                "images by URL are turned off on this server; upload the image instead "
                "(an operator may allow hosts with INFERD_IMAGE_URL_ALLOWED_HOSTS)"
            )
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if parts.scheme not in ("http", "https") or not host:
            raise BadRequest(f"url must be an http or https URL with a host, got {url[:200]!r}")
        if host not in self.allowed_hosts:
            raise UrlNotAllowed(
                f"images by URL are allowed from {', '.join(sorted(self.allowed_hosts))} only, "
                f"not from {host!r}"
            )
        limit = pre.spec.max_bytes
        try:
            async with (
                httpx.AsyncClient(timeout=self.url_timeout, follow_redirects=False) as client,
                client.stream("GET", url) as response,
            ):
                if response.status_code != 200:
                    raise BadRequest(
                        f"fetching the image at {url[:200]!r} gave HTTP {response.status_code}"
                    )
                length = response.headers.get("content-length")
                if length is not None and length.isdigit() and int(length) > limit:
                    pre.check_size(int(length))
                chunks, size = [], 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > limit:
                        pre.check_size(size)
                    chunks.append(chunk)
        except httpx.HTTPError as exc:
            raise BadRequest(
                f"could not fetch the image at {url[:200]!r}: {type(exc).__name__}"
            ) from None
        return b"".join(chunks)


class ImageInbound:
    """One image classification request, as the data plane sees it."""

    def __init__(
        self,
        service: VisionService,
        ctx: RequestContext,
        request: Request,
        name: str,
        top_k: int | None,
    ) -> None:
        self.service = service
        self.ctx = ctx
        self.request = request
        self.model: str | None = name
        self.version: int | None = None
        self.top_k = top_k
        self.timeout = service.timeout
        self._data = b""

    def accept(self, loaded: LoadedModel) -> None:
        if not loaded.spec.takes_images:
            where = (
                "POST /v1/requests"
                if loaded.spec.generates_text
                else f"POST /v1/models/{loaded.name}/predict"
            )
            raise BadRequest(
                f"model {loaded.name!r} takes {loaded.spec.input.type} input, not images; "
                f"use {where}"
            )

    async def read(self, loaded: LoadedModel) -> None:
        header = self.request.headers.get("x-request-timeout-ms")
        if header is not None:
            self.timeout = min(self.timeout, request_timeout(header))
        _top_k(self.top_k, _n_classes(loaded))  # a wrong top_k is refused before the upload
        pre = self.service.preprocessor(loaded)
        self._data = await self.service._image_bytes(self.request, pre)

    async def decode(
        self, loaded: LoadedModel, deadline: float, previous: Decoded[Any] | None
    ) -> Decoded[tuple[int, ImageSpec]]:
        k = _top_k(self.top_k, _n_classes(loaded))
        image = loaded.spec.image
        if previous is not None and previous.meta[1] == image:
            prepared: Any = previous.payload  # the new version prepares images the same way
        else:
            pre = self.service.preprocessor(loaded)
            prepared = (await self.service._prepare(pre, self._data, deadline)).array
        return Decoded(prepared, 1, (k, image))

    def disconnect_probe(self) -> Callable[[], bool] | None:
        return disconnect_probe(self.request.receive)

    def watch(self, future: asyncio.Future[Any]) -> asyncio.Task[None] | None:
        return watch_disconnect(self.request.receive, future)

    def encode(
        self, loaded: LoadedModel, decoded: Decoded[tuple[int, ImageSpec]], output: Any
    ) -> bytes:
        ctx, service = self.ctx, self.service
        now = time.perf_counter()
        submitted = ctx.submitted if ctx.submitted is not None else now
        inference_ms = (now - submitted) * 1000.0
        service.metrics.prediction_duration.labels(loaded.name, loaded.version_str).observe(
            now - ctx.started
        )
        probabilities = np.asarray(output[0], dtype=np.float64)
        order = np.argsort(-probabilities, kind="stable")[: decoded.meta[0]]
        labels = loaded.labels
        predictions = [
            {
                "label": labels[i] if labels is not None else str(i),
                "class_id": int(i),
                "probability": float(probabilities[i]),
            }
            for i in order
        ]
        if service.debug:
            log.debug(
                "prediction",
                request_id=ctx.request_id,
                model=loaded.name,
                inference_time_ms=round(inference_ms, 3),
                **{"class": predictions[0]["label"]},
                probability=predictions[0]["probability"],
            )
        return orjson.dumps(
            {
                "model": loaded.name,
                "version": loaded.version_str,
                "predictions": predictions,
                "inference_time_ms": round(inference_ms, 3),
                "request_id": ctx.request_id,
            }
        )


def _n_classes(loaded: LoadedModel) -> int:
    return len(loaded.labels or loaded.classes or ())


async def _read(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is over ``limit`` bytes."""
    check_length(request.headers.get("content-length"), limit)
    return await read_body(request.receive, limit)


def _multipart_file(body: bytes, content_type: bytes) -> bytes:
    """The content of the form field ``file`` (or ``image``) of a multipart body."""
    _, params = parse_options_header(content_type)
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary parameter")
    parts: list[tuple[dict[bytes, bytes], bytes]] = []
    headers: dict[bytes, bytes] = {}
    field: list[bytes] = []
    value: list[bytes] = []
    data: list[bytes] = []

    def on_part_begin() -> None:
        headers.clear()
        data.clear()

    def on_header_field(buf: bytes, start: int, end: int) -> None:
        field.append(buf[start:end])

    def on_header_value(buf: bytes, start: int, end: int) -> None:
        value.append(buf[start:end])

    def on_header_end() -> None:
        headers[b"".join(field).strip().lower()] = b"".join(value).strip()
        field.clear()
        value.clear()

    def on_part_data(buf: bytes, start: int, end: int) -> None:
        data.append(buf[start:end])

    def on_part_end() -> None:
        parts.append((dict(headers), b"".join(data)))

    callbacks: Any = {
        "on_part_begin": on_part_begin,
        "on_header_field": on_header_field,
        "on_header_value": on_header_value,
        "on_header_end": on_header_end,
        "on_part_data": on_part_data,
        "on_part_end": on_part_end,
    }
    try:
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise BadRequest(f"malformed multipart/form-data body: {exc}") from None
    names = []
    for part_headers, content in parts:
        _, disposition = parse_options_header(part_headers.get(b"content-disposition", b""))
        name = disposition.get(b"name", b"")
        if name in _FIELDS:
            return content
        names.append(name.decode("latin-1"))
    raise BadRequest(
        "multipart/form-data body has no field named file or image"
        + (f" (fields: {', '.join(names)})" if names else "")
    )


def _json_url(body: bytes) -> str:
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise BadRequest('malformed JSON body; send {"url": "https://..."}') from None
    url = doc.get("url") if isinstance(doc, dict) else None
    if not isinstance(url, str) or not url:
        raise BadRequest(
            'a JSON body names an image by URL: {"url": "https://..."}; to upload an image, '
            "send its bytes as the body or as multipart/form-data"
        )
    return url


def _top_k(top_k: int | None, n_classes: int) -> int:
    if top_k is None:
        return max(1, min(_DEFAULT_TOP_K, n_classes))
    if not 1 <= top_k <= n_classes:
        raise ValidationFailed(f"top_k must be between 1 and {n_classes} (the model's classes)")
    return top_k


_IMAGE_BODY = {
    "required": True,
    "content": {
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "image/webp": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"file": {"type": "string", "format": "binary"}},
                "required": ["file"],
            }
        },
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"url": {"type": "string", "format": "uri"}},
                "required": ["url"],
            }
        },
    },
}
_RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {
        "description": "The most likely classes, best first",
        "content": {
            "application/json": {
                "example": {
                    "model": "digits",
                    "version": "1",
                    "predictions": [
                        {"label": "7", "class_id": 7, "probability": 0.97},
                        {"label": "1", "class_id": 1, "probability": 0.02},
                    ],
                    "inference_time_ms": 3.1,
                    "request_id": "5f0c1e2a9b7d-2",
                }
            }
        },
    },
    400: {"description": "Not an image model, malformed upload or URL"},
    403: {"description": "Image URL on a host that is not allowed"},
    404: {"description": "No such model"},
    413: {"description": "Image over the model's byte or pixel limit"},
    415: {"description": "Not an image, or a format the model does not accept"},
    503: {"description": "Model loading or overloaded; see Retry-After"},
    504: {"description": "Deadline exceeded"},
}


def build_vision_router(service: VisionService) -> APIRouter:
    """The FastAPI routes of image classification."""
    router = APIRouter(tags=["vision"])
    top_k_query = Query(
        None, ge=1, description=f"How many classes to return, best first (default {_DEFAULT_TOP_K})"
    )

    @router.post(
        _CLASSIFY_ENDPOINT,
        summary="Classify one image with a named model",
        responses=_RESPONSES,
        openapi_extra={"requestBody": _IMAGE_BODY},
    )
    async def classify(name: str, request: Request, top_k: int | None = top_k_query) -> Response:
        return await service.classify(request, name, top_k)

    @router.post(
        _PREDICT_ENDPOINT,
        summary="Classify one image with the default image model",
        responses=_RESPONSES,
        openapi_extra={"requestBody": _IMAGE_BODY},
    )
    async def predict(request: Request, top_k: int | None = top_k_query) -> Response:
        return await service.classify(request, None, top_k)

    return router
