"""The Open Inference Protocol (V2, the REST protocol of KServe, Triton and MLServer).

Server and model metadata, health, ``infer`` with JSON and binary tensors, and the model
repository extension, so that clients written for those servers work unchanged (the tests
use ``tritonclient.http``). Inference takes the same road as
``/v1/models/{name}/predict``: the model's batcher (admission before the body is read, the
deadline, the queue), the caller's daily token budget (one token per row), the same metrics.

How inferd's models look as tensors is in :mod:`inferd.http.v2_models`, the wire format
(JSON and binary tensors) in :mod:`inferd.http.v2_codec`. Errors are the protocol's
``{"error": "<message>"}``. See docs/v2.md.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response

from inferd import __version__
from inferd.batching import Batcher
from inferd.errors import BadRequest, InferdError, ModelNotFound
from inferd.http.body import check_length, decompress, read_body
from inferd.http.context import disconnect_probe, request_timeout, watch_disconnect
from inferd.http.responses import method_not_allowed
from inferd.http.v2_codec import InferRequest, RequestedOutput, encode_response, parse_request
from inferd.http.v2_models import (
    INPUT_NAME,
    model_input,
    model_metadata,
    model_outputs,
    render_output,
    selected_outputs,
)
from inferd.models.base import FloatArray
from inferd.models.registry import LoadedModel
from inferd.serving import DataPlane, Decoded, RequestContext
from inferd.settings import Settings

__all__ = ["EXTENSIONS", "OpenInference", "build_v2_router"]

EXTENSIONS = ["binary_tensor_data", "classification", "model_repository"]
"""Protocol extensions served here, as ``GET /v2`` lists them."""

_JSON = "application/json"
_BINARY = "application/octet-stream"
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string", "examples": [INPUT_NAME]},
        "shape": {"type": "array", "items": {"type": "integer"}, "examples": [[1, 4]]},
        "datatype": {"type": "string", "examples": ["FP64"]},
        "parameters": {"type": "object"},
        "data": {"type": "array", "examples": [[5.1, 3.5, 1.4, 0.2]]},
    },
}
_INFER_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["inputs"],
                "properties": {
                    "id": {"type": "string"},
                    "parameters": {"type": "object"},
                    "inputs": {"type": "array", "items": _TENSOR},
                    "outputs": {"type": "array", "items": {"type": "object"}},
                },
            }
        },
        "application/octet-stream": {
            "schema": {
                "type": "string",
                "format": "binary",
                "description": "The JSON request, then the binary tensors; "
                "Inference-Header-Content-Length gives the length of the JSON",
            }
        },
    },
}


class OpenInference:
    """The V2 routes over the registry; :func:`build_v2_router` mounts them."""

    def __init__(self, plane: DataPlane, settings: Settings) -> None:
        self.plane = plane
        self.registry = plane.registry
        self.max_body = settings.max_body_bytes
        self.max_instances = settings.max_instances
        self.timeout = settings.request_timeout_ms / 1000.0

    # ------------------------------------------------------------------ server
    def server_metadata(self) -> dict[str, Any]:
        return {"name": "inferd", "version": __version__, "extensions": EXTENSIONS}

    # ------------------------------------------------------------------ models
    def lookup(self, name: str, version: str | None) -> LoadedModel:
        """The ready version asked for (the default one when ``version`` is None)."""
        return self.registry.get(name, None if version is None else _version(name, version))

    def known(self, name: str, version: str | None) -> LoadedModel:
        """The version asked for whatever its state (loading, failed); 404 if none."""
        wanted = None if version is None else _version(name, version)
        if wanted is None:
            found = self.registry.find(name)
        else:
            found = next(
                (m for m in self.registry.all() if m.name == name and m.version == wanted), None
            )
        if found is not None:
            return found
        return self.registry.get(name, wanted)  # raises, saying why (unknown, no such version)

    def model_metadata(self, name: str, version: str | None) -> dict[str, Any]:
        loaded = self.known(name, version)
        served = [m.version_str for m in self.registry.versions(name)]
        return model_metadata(loaded, served or [loaded.version_str])

    def model_ready(self, name: str, version: str | None) -> tuple[int, dict[str, Any]]:
        loaded = self.known(name, version)
        ready = loaded.ready
        body: dict[str, Any] = {"name": loaded.name, "version": loaded.version_str, "ready": ready}
        if not ready:
            body["state"] = loaded.state.value
            if loaded.error:
                body["reason"] = loaded.error
        # The protocol's health answers are a status: 200 is true, a 4xx is false.
        return (200 if ready else 400), body

    # ------------------------------------------------------------------ infer
    async def infer(
        self, request: Request, name: str, version: str | None, ctx: RequestContext
    ) -> Response:
        inbound = V2Inbound(self, ctx, request, name, version)
        content, json_length = await self.plane.infer(inbound)
        if json_length is None:
            return Response(content, 200, media_type=_JSON)
        return Response(
            content,
            200,
            headers={"inference-header-content-length": str(json_length)},
            media_type=_BINARY,
        )

    async def read_body(self, request: Request) -> bytes:
        """The body, counted against ``max_body_bytes``, decompressed if the client sent it
        compressed (``tritonclient`` can: gzip or deflate)."""
        headers = request.headers
        check_length(headers.get("content-length"), self.max_body)
        body = await read_body(request.receive, self.max_body)
        return decompress(body, headers.get("content-encoding"), self.max_body)

    # ------------------------------------------------------------------ repository
    async def repository_index(self, body: bytes) -> list[dict[str, Any]]:
        doc = _json_object(body, "repository index request")
        ready_only = doc.get("ready", False)
        if not isinstance(ready_only, bool):
            raise BadRequest("ready must be true or false")
        index = await self.registry.index()
        if ready_only:
            index = [row for row in index if str(row.get("state", "")).upper() == "READY"]
        return index

    async def load(self, name: str, body: bytes) -> None:
        parameters = _json_object(body, "load request").get("parameters")
        parameters = {} if parameters is None else parameters
        if not isinstance(parameters, dict):
            raise BadRequest("parameters must be an object")
        if parameters:
            raise BadRequest(
                "inferd loads models from its repository folder; load parameters (config, "
                f"files) are not supported, got {', '.join(sorted(parameters))}"
            )
        await self.registry.load_model(name)

    async def unload(self, name: str, body: bytes) -> None:
        parameters = _json_object(body, "unload request").get("parameters")
        parameters = {} if parameters is None else parameters
        if not isinstance(parameters, dict):
            raise BadRequest("parameters must be an object")
        await self.registry.unload_model(name)


class V2Inbound:
    """One V2 ``infer`` request, as the data plane sees it."""

    def __init__(
        self,
        v2: OpenInference,
        ctx: RequestContext,
        request: Request,
        name: str,
        version: str | None,
    ) -> None:
        self.v2 = v2
        self.ctx = ctx
        self.request = request
        self.model: str | None = name
        self.version = None if version is None else _version(name, version)
        self.timeout = v2.timeout
        self._parsed: InferRequest | None = None

    def accept(self, loaded: LoadedModel) -> None:
        _batcher(loaded)

    async def read(self, loaded: LoadedModel) -> None:
        headers = self.request.headers
        header_length: int | None = None
        raw = headers.get("inference-header-content-length")
        if raw is not None:
            if not raw.strip().isdigit():
                raise BadRequest(
                    f"Inference-Header-Content-Length must be a number of bytes, got {raw!r}"
                )
            header_length = int(raw)
        given = headers.get("x-request-timeout-ms")
        if given is not None:
            self.timeout = min(self.timeout, request_timeout(given))
        body = await self.v2.read_body(self.request)
        parsed = self._parsed = parse_request(body, header_length)
        if parsed.id and parsed.id.isascii() and parsed.id.isprintable():
            self.ctx.request_id = parsed.id

    async def decode(
        self, loaded: LoadedModel, deadline: float, previous: Decoded[Any] | None
    ) -> Decoded[tuple[InferRequest, list[RequestedOutput]]]:
        parsed = self._parsed
        assert parsed is not None
        rows = model_input(parsed, loaded, self.v2.max_instances)
        selected = selected_outputs(parsed, loaded)
        wanted_us = parsed.parameters.get("timeout")  # tritonclient's, in microseconds
        timeout = wanted_us / 1e6 if type(wanted_us) is int and wanted_us > 0 else None
        return Decoded(rows, rows.shape[0], (parsed, selected), timeout)

    def disconnect_probe(self) -> Callable[[], bool] | None:
        return disconnect_probe(self.request.receive)

    def watch(self, future: asyncio.Future[Any]) -> asyncio.Task[None] | None:
        return watch_disconnect(self.request.receive, future)

    def encode(
        self,
        loaded: LoadedModel,
        decoded: Decoded[tuple[InferRequest, list[RequestedOutput]]],
        output: FloatArray,
    ) -> tuple[bytes, int | None]:
        parsed, selected = decoded.meta
        tensors = model_outputs(loaded, output)
        return encode_response(
            loaded.name,
            loaded.version_str,
            parsed.id,
            [render_output(tensors, wanted, loaded, parsed.binary_output) for wanted in selected],
        )


# ---------------------------------------------------------------------------------- helpers
def _version(name: str, version: str) -> int:
    if not (version.isascii() and version.isdigit()) or int(version) < 1:
        raise ModelNotFound(
            f"model {name!r} has no version {version!r}; versions are positive integers"
        )
    return int(version)


def _batcher(loaded: LoadedModel) -> Batcher[FloatArray, FloatArray]:
    if loaded.batcher is None or loaded.spec.generates_text:
        raise BadRequest(
            f"model {loaded.name!r} generates text, which has no tensors here; submit it with "
            "POST /v1/requests and follow its events"
        )
    return loaded.batcher


def _repository_body(properties: dict[str, Any]) -> dict[str, Any]:
    """The optional JSON body of a repository route (any Content-Type is read as JSON)."""
    return {
        "required": False,
        "content": {_JSON: {"schema": {"type": "object", "properties": properties}}},
    }


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise BadRequest(f"{what} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"{what} must be a JSON object")
    return doc


def _error(error: InferdError) -> Response:
    """The protocol's error body. A 422 (read but invalid) is the protocol's 400 here."""
    status = 400 if error.status_code == 422 else error.status_code
    return Response(
        orjson.dumps({"error": error.message}),
        status,
        headers=error.headers(),
        media_type=_JSON,
    )


def _json_response(doc: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(doc), status, media_type=_JSON)


def _context(request: Request) -> RequestContext:
    ctx = request.scope.get("inferd")
    if isinstance(ctx, RequestContext):
        return ctx
    # Mounted without the middleware (tests of the bare router): a context of its own.
    ctx = RequestContext("-", time.perf_counter(), asyncio.get_running_loop().time())
    request.scope["inferd"] = ctx
    return ctx


# ---------------------------------------------------------------------------------- routes
def build_v2_router(plane: DataPlane, settings: Settings) -> APIRouter:
    """The ``/v2`` routes."""
    v2 = OpenInference(plane, settings)
    registry = plane.registry
    router = APIRouter(prefix="/v2", tags=["open inference protocol (v2)"])

    async def guarded(request: Request, call: Any) -> Response:
        ctx = _context(request)
        try:
            result: Response = await call(ctx)
            return result
        except InferdError as error:
            ctx.detail = error.message
            return _error(error)
        # A client that has gone (ClientGone) is the app's exception handler's: no answer.

    @router.get("", summary="Server metadata: name, version, protocol extensions")
    async def server_metadata() -> Response:
        return _json_response(v2.server_metadata())

    @router.get("/health/live", summary="Liveness: 200 while the process answers")
    async def live() -> Response:
        return _json_response({"live": True})

    @router.get("/health/ready", summary="Readiness: 200 once every configured model is ready")
    async def ready() -> Response:
        is_ready = registry.ready
        return _json_response({"ready": is_ready}, 200 if is_ready else 400)

    async def metadata(request: Request, name: str, version: str | None) -> Response:
        async def call(ctx: RequestContext) -> Response:
            return _json_response(v2.model_metadata(name, version))

        return await guarded(request, call)

    async def model_ready(request: Request, name: str, version: str | None) -> Response:
        async def call(ctx: RequestContext) -> Response:
            status, body = v2.model_ready(name, version)
            return _json_response(body, status)

        return await guarded(request, call)

    async def infer(request: Request, name: str, version: str | None) -> Response:
        async def call(ctx: RequestContext) -> Response:
            return await v2.infer(request, name, version, ctx)

        return await guarded(request, call)

    @router.get("/models/{name}", summary="Model metadata: versions, inputs, outputs")
    async def get_metadata(request: Request, name: str) -> Response:
        return await metadata(request, name, None)

    @router.get("/models/{name}/versions/{version}", summary="Metadata of one model version")
    async def get_version_metadata(request: Request, name: str, version: str) -> Response:
        return await metadata(request, name, version)

    @router.get("/models/{name}/ready", summary="Model readiness: 200 ready, 400 not yet")
    async def get_ready(request: Request, name: str) -> Response:
        return await model_ready(request, name, None)

    @router.get("/models/{name}/versions/{version}/ready", summary="Readiness of one version")
    async def get_version_ready(request: Request, name: str, version: str) -> Response:
        return await model_ready(request, name, version)

    @router.post(
        "/models/{name}/infer",
        summary="Inference with the default version",
        openapi_extra={"requestBody": _INFER_BODY},
    )
    async def post_infer(request: Request, name: str) -> Response:
        return await infer(request, name, None)

    @router.post(
        "/models/{name}/versions/{version}/infer",
        summary="Inference with one version",
        openapi_extra={"requestBody": _INFER_BODY},
    )
    async def post_version_infer(request: Request, name: str, version: str) -> Response:
        return await infer(request, name, version)

    @router.post(
        "/repository/index",
        summary="Models in the repository and their state",
        openapi_extra={"requestBody": _repository_body({"ready": {"type": "boolean"}})},
    )
    async def repository_index(request: Request) -> Response:
        async def call(ctx: RequestContext) -> Response:
            return _json_response(await v2.repository_index(await v2.read_body(request)))

        return await guarded(request, call)

    @router.post(
        "/repository/models/{name}/load",
        summary="Load (or reload) a model",
        openapi_extra={
            "requestBody": _repository_body(
                {"parameters": {"type": ["object", "null"], "maxProperties": 0}}
            )
        },
    )
    async def load(request: Request, name: str) -> Response:
        async def call(ctx: RequestContext) -> Response:
            ctx.model = name
            await v2.load(name, await v2.read_body(request))
            return Response(status_code=200)

        return await guarded(request, call)

    @router.post(
        "/repository/models/{name}/unload",
        summary="Unload a model",
        openapi_extra={
            "requestBody": _repository_body({"parameters": {"type": ["object", "null"]}})
        },
    )
    async def unload(request: Request, name: str) -> Response:
        async def call(ctx: RequestContext) -> Response:
            ctx.model = name
            await v2.unload(name, await v2.read_body(request))
            return Response(status_code=200)

        return await guarded(request, call)

    @router.api_route(
        "/{rest:path}", methods=["GET", "POST", "PUT", "DELETE"], include_in_schema=False
    )
    async def not_served(request: Request, rest: str) -> Response:
        wrong = method_not_allowed(router.routes, request.method, request.url.path)
        if wrong is not None:  # a route of its own with another method
            return _error(wrong)
        # Other V2 routes (statistics, shared memory, tracing) answer in the protocol's shape.
        return _error(
            ModelNotFound(f"{request.method} {request.url.path} is not served by inferd's V2 API")
        )

    return router
