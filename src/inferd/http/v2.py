"""The Open Inference Protocol (V2, the REST protocol of KServe, Triton and MLServer).

Server and model metadata, health, ``infer`` with JSON and binary tensors, and the model
repository extension, so that clients written for those servers work unchanged (the tests
use ``tritonclient.http``). ``infer`` is answered on the lean ASGI path
(:meth:`OpenInference.serve_infer`, routed by :mod:`inferd.http.hotpath`); the rest is a
FastAPI router. Inference takes the same road as
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
from inferd.http.body import check_length, decompress, read_body, whole_body
from inferd.http.context import disconnect_probe, request_timeout, watch_disconnect
from inferd.http.responses import method_not_allowed, send_answer
from inferd.http.v2_codec import (
    InferRequest,
    RequestedOutput,
    Tensor,
    encode_response,
    parse_request,
)
from inferd.http.v2_models import (
    json_answer,
    model_input,
    model_metadata,
    model_outputs,
    render_output,
    selected_outputs,
)
from inferd.models.base import FloatArray
from inferd.models.registry import LoadedModel
from inferd.serving import ClientGone, DataPlane, Decoded, RequestContext
from inferd.settings import Settings

__all__ = [
    "EXTENSIONS",
    "OpenInference",
    "V2Inbound",
    "build_v2_router",
    "decode_infer",
    "render_outputs",
    "require_tensors",
]

EXTENSIONS = ["binary_tensor_data", "classification", "model_repository"]
"""Protocol extensions served here, as ``GET /v2`` lists them."""

_JSON = "application/json"
_JSON_TYPE = (b"content-type", b"application/json")
_BINARY_TYPE = (b"content-type", b"application/octet-stream")


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
    async def serve_infer(
        self,
        scope: dict[str, Any],
        receive: Any,
        send: Any,
        params: dict[str, Any],
        ctx: RequestContext,
    ) -> None:
        """Answer ``POST /v2/models/{name}[/versions/{version}]/infer`` on the lean path
        (:mod:`inferd.http.hotpath` routes it here): the data plane, then the answer in JSON
        or with binary tensors; errors in the protocol's shape."""
        headers: list[tuple[bytes, bytes]]
        try:
            inbound = V2Inbound(self, ctx, scope, receive, params["name"], params.get("version"))
            content, json_length = await self.plane.infer(inbound)
            status = 200
            if json_length is None:
                headers = [_JSON_TYPE]
            else:
                headers = [_BINARY_TYPE, (b"inference-header-content-length", b"%d" % json_length)]
        except ClientGone:
            ctx.detail = "client disconnected; dropped before the model ran"
            return
        except InferdError as error:
            ctx.detail = error.message
            status, content = _error_status(error), orjson.dumps({"error": error.message})
            headers = [_JSON_TYPE, *((k.encode(), v.encode()) for k, v in error.headers().items())]
        await send_answer(send, ctx, status, headers, content)

    async def read_body(self, request: Request) -> bytes:
        """The body of a FastAPI route, counted against ``max_body_bytes``, decompressed if
        the client sent it compressed (``tritonclient`` can: gzip or deflate)."""
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
    """One V2 ``infer`` request of the lean path, as the data plane sees it."""

    __slots__ = ("_parsed", "ctx", "model", "receive", "scope", "timeout", "v2", "version")

    def __init__(
        self,
        v2: OpenInference,
        ctx: RequestContext,
        scope: dict[str, Any],
        receive: Any,
        name: str,
        version: str | None,
    ) -> None:
        self.v2 = v2
        self.ctx = ctx
        self.scope = scope
        self.receive = receive
        self.model: str | None = name
        self.version = None if version is None else _version(name, version)
        self.timeout = v2.timeout
        self._parsed: InferRequest | None = None

    def accept(self, loaded: LoadedModel) -> None:
        require_tensors(loaded)

    async def read(self, loaded: LoadedModel) -> None:
        header_length: int | None = None
        length = encoding = None
        for key, value in self.scope["headers"]:
            if key == b"content-length":
                length = value
            elif key == b"inference-header-content-length":
                if not value.strip().isdigit():
                    raise BadRequest(
                        "Inference-Header-Content-Length must be a number of bytes, got "
                        f"{value.decode('latin-1')!r}"
                    )
                header_length = int(value)
            elif key == b"x-request-timeout-ms":
                self.timeout = min(self.timeout, request_timeout(value))
            elif key == b"content-encoding":
                encoding = value.decode("latin-1")
        max_body = self.v2.max_body
        check_length(length, max_body)
        message = await self.receive()
        body = whole_body(message, max_body)
        if body is None:
            body = await read_body(self.receive, max_body, message)
        body = decompress(body, encoding, max_body)
        parsed = self._parsed = parse_request(body, header_length)
        if parsed.id and parsed.id.isascii() and parsed.id.isprintable():
            self.ctx.request_id = parsed.id

    async def decode(
        self, loaded: LoadedModel, deadline: float, previous: Decoded[Any] | None
    ) -> Decoded[tuple[InferRequest, list[RequestedOutput]]]:
        parsed = self._parsed
        assert parsed is not None
        return decode_infer(parsed, loaded, self.v2.max_instances)

    def disconnect_probe(self) -> Callable[[], bool] | None:
        return disconnect_probe(self.receive)

    def watch(self, future: asyncio.Future[Any]) -> asyncio.Task[None] | None:
        return watch_disconnect(self.receive, future)

    def encode(
        self,
        loaded: LoadedModel,
        decoded: Decoded[tuple[InferRequest, list[RequestedOutput]]],
        output: FloatArray,
    ) -> tuple[bytes, int | None]:
        parsed = decoded.meta[0]
        if parsed.outputs is None and not parsed.binary_output:  # what most requests ask
            return json_answer(loaded, parsed.id, output), None
        return encode_response(
            loaded.name, loaded.version_str, parsed.id, render_outputs(loaded, decoded, output)
        )


def decode_infer(
    parsed: InferRequest, loaded: LoadedModel, max_instances: int
) -> Decoded[tuple[InferRequest, list[RequestedOutput]]]:
    """A parsed request decoded for ``loaded``: its rows, the outputs it asks for, and the
    shorter deadline it may ask for (``parameters.timeout``, in microseconds, as tritonclient
    sends it). The gRPC servicer decodes the same way."""
    rows = model_input(parsed, loaded, max_instances)
    selected = selected_outputs(parsed, loaded)
    wanted_us = parsed.parameters.get("timeout")
    timeout = wanted_us / 1e6 if type(wanted_us) is int and wanted_us > 0 else None
    return Decoded(rows, rows.shape[0], (parsed, selected), timeout)


def render_outputs(
    loaded: LoadedModel,
    decoded: Decoded[tuple[InferRequest, list[RequestedOutput]]],
    output: FloatArray,
) -> list[tuple[Tensor, bool]]:
    """The outputs asked for, each with whether to send it binary."""
    parsed, selected = decoded.meta
    tensors = model_outputs(loaded, output)
    return [render_output(tensors, wanted, loaded, parsed.binary_output) for wanted in selected]


# ---------------------------------------------------------------------------------- helpers
def _version(name: str, version: str) -> int:
    if not (version.isascii() and version.isdigit()) or int(version) < 1:
        raise ModelNotFound(
            f"model {name!r} has no version {version!r}; versions are positive integers"
        )
    return int(version)


def require_tensors(loaded: LoadedModel) -> Batcher[FloatArray, FloatArray]:
    """The model's batcher; a 400 for a model that has no tensors (text generation)."""
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


def _error_status(error: InferdError) -> int:
    """A 422 (read but invalid) is the protocol's 400."""
    return 400 if error.status_code == 422 else error.status_code


def _error(error: InferdError) -> Response:
    """The protocol's error body."""
    status = _error_status(error)
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
