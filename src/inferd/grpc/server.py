"""The Open Inference Protocol over gRPC: ``inference.GRPCInferenceService`` on grpc.aio.

``inferd serve --grpc-port N`` (``INFERD_GRPC_PORT``) starts it in the HTTP server's process
and event loop, so it shares everything with the REST routes: the registry, the data plane
(admission, deadline, batcher, the caller's daily budget), keys and their limits, the request
metrics and the access log. What differs is only how a call is carried:

* keys come in the ``authorization: Bearer <key>`` (or ``x-api-key``) metadata and need the
  scopes their REST twins need (``predict`` to infer and read metadata, ``admin`` for the
  repository); health and server metadata are public, as on REST;
* the call's gRPC deadline shortens the server's own (``request_timeout_ms``), as
  ``X-Request-Timeout-Ms`` does, and so does the request parameter ``timeout`` (µs);
* refusals are gRPC status codes (:data:`STATUS_CODES`): a shed request is ``UNAVAILABLE``, a
  spent rate or budget ``RESOURCE_EXHAUSTED`` (both with ``retry-after`` in the trailing
  metadata), a passed deadline ``DEADLINE_EXCEEDED``;
* the metrics count calls with ``method="GRPC"`` and ``endpoint`` the RPC's full name, with the
  HTTP status the same refusal has on REST, and the access line says the same.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc

from inferd import __version__
from inferd.errors import BadRequest, InferdError, ModelNotFound
from inferd.grpc import codec
from inferd.grpc import grpc_predict_v2_pb2 as pb
from inferd.http.context import incoming_id
from inferd.http.v2 import (
    EXTENSIONS,
    OpenInference,
    decode_infer,
    render_outputs,
    require_tensors,
)
from inferd.http.v2_codec import InferRequest, RequestedOutput
from inferd.logs import AccessLog, get_logger
from inferd.metrics import Metrics
from inferd.models.base import FloatArray
from inferd.models.registry import LoadedModel
from inferd.serving import ClientGone, DataPlane, Decoded, RequestContext
from inferd.tenancy.auth import Authenticator, required_scope
from inferd.tenancy.enforce import Enforcer

__all__ = ["SERVICE", "STATUS_CODES", "GrpcServer"]

log = get_logger("inferd.grpc")

SERVICE = "inference.GRPCInferenceService"

STATUS_CODES: dict[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    409: grpc.StatusCode.FAILED_PRECONDITION,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    415: grpc.StatusCode.INVALID_ARGUMENT,
    422: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
"""The gRPC status of each HTTP status a refusal has on REST (others: ``UNKNOWN``)."""


Handler = Callable[[Any, Any, RequestContext], Awaitable[Any]]


class GrpcServer:
    """``inference.GRPCInferenceService`` on ``host:port``, served from the running loop."""

    def __init__(
        self,
        v2: OpenInference,
        host: str,
        port: int,
        metrics: Metrics,
        access_log: AccessLog,
        auth: Authenticator | None = None,
        enforcer: Enforcer | None = None,
    ) -> None:
        self.v2 = v2
        self.plane: DataPlane = v2.plane
        self.registry = v2.registry
        self.address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        self.metrics = metrics
        self.access_log = access_log
        self.auth = auth
        self.enforcer = enforcer
        self._server: Any = None
        self._prefix = os.urandom(6).hex()
        self._ids = itertools.count(1)
        self._children: dict[tuple[str, int], Any] = {}
        self._durations: dict[str, Any] = {}

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        """Bind and start serving; raises if the port cannot be bound."""
        options = [
            ("grpc.max_receive_message_length", self.v2.max_body),
            ("grpc.max_send_message_length", -1),
            ("grpc.so_reuseport", 0),
        ]
        server = grpc.aio.server(options=options)
        calls: dict[str, tuple[Handler, Any, str, str]] = {
            "ServerLive": (self._server_live, pb.ServerLiveRequest, "GET", "/v2/health/live"),
            "ServerReady": (self._server_ready, pb.ServerReadyRequest, "GET", "/v2/health/ready"),
            "ServerMetadata": (self._server_metadata, pb.ServerMetadataRequest, "GET", "/v2"),
            "ModelReady": (self._model_ready, pb.ModelReadyRequest, "GET", "/v2/models/m/ready"),
            "ModelMetadata": (self._model_metadata, pb.ModelMetadataRequest, "GET", "/v2/models/m"),
            "ModelInfer": (self._model_infer, pb.ModelInferRequest, "POST", "/v2/models/m/infer"),
            "RepositoryIndex": (
                self._repository_index,
                pb.RepositoryIndexRequest,
                "POST",
                "/v2/repository/index",
            ),
            "RepositoryModelLoad": (
                self._load,
                pb.RepositoryModelLoadRequest,
                "POST",
                "/v2/repository/models/m/load",
            ),
            "RepositoryModelUnload": (
                self._unload,
                pb.RepositoryModelUnloadRequest,
                "POST",
                "/v2/repository/models/m/unload",
            ),
        }
        handlers = {
            name: grpc.unary_unary_rpc_method_handler(
                self._rpc(name, handler, required_scope(method, path)),
                request_deserializer=request_type.FromString,
                response_serializer=_serialize,
            )
            for name, (handler, request_type, method, path) in calls.items()
        }
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        if hasattr(server, "add_registered_method_handlers"):
            server.add_registered_method_handlers(SERVICE, handlers)
        if server.add_insecure_port(self.address) == 0:
            raise OSError(f"could not bind the gRPC server to {self.address}")
        await server.start()
        self._server = server
        log.info("serving gRPC", address=self.address)

    async def stop(self, grace: float) -> None:
        """Refuse new calls and let those in flight finish within ``grace`` seconds."""
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None

    # ------------------------------------------------------------------ one call
    def _rpc(
        self, name: str, handler: Handler, scope: str | None
    ) -> Callable[[Any, Any], Awaitable[Any]]:
        endpoint = f"/{SERVICE}/{name}"

        async def call(request: Any, context: Any) -> Any:
            started = time.perf_counter()
            metadata = _metadata(context)
            ctx = RequestContext(
                incoming_id(metadata) or f"{self._prefix}-{next(self._ids):x}",
                started,
                asyncio.get_running_loop().time(),
            )
            ctx.endpoint = endpoint
            ctx.headers = metadata  # x-inferd-priority, x-inferd-variant, a sticky field
            error: InferdError | None = None
            try:
                if self.auth is not None and scope is not None:
                    await self._admit(metadata, scope, ctx)
                response = await handler(request, context, ctx)
                ctx.status = 200
            except InferdError as exc:
                error = exc
                ctx.status, ctx.detail = exc.status_code, exc.message
            except ClientGone:
                ctx.detail = "client cancelled; dropped before the model ran"
                raise asyncio.CancelledError from None
            except asyncio.CancelledError:
                ctx.detail = ctx.detail or "client cancelled or its deadline passed"
                raise
            except Exception as exc:
                log.exception("unhandled error", request_id=ctx.request_id, rpc=name)
                ctx.status, ctx.detail = 500, f"unhandled {type(exc).__name__}"
                error = InferdError(f"internal server error; quote request id {ctx.request_id}")
            finally:
                self._finish(ctx)
            trailing = [("x-request-id", ctx.request_id)]
            if error is None:
                context.set_trailing_metadata(trailing)
                return response
            trailing.extend((k.lower(), v) for k, v in error.headers().items())
            context.set_trailing_metadata(trailing)
            code = STATUS_CODES.get(error.status_code, grpc.StatusCode.UNKNOWN)
            await context.abort(code, error.message)  # raises: the call ends with the code
            return None

        return call

    async def _admit(self, metadata: list[tuple[bytes, bytes]], scope: str, ctx: Any) -> None:
        """Authenticate and authorize as the HTTP middleware does (same scopes, same limits)."""
        auth = self.auth
        assert auth is not None
        try:
            key = auth.cached(metadata) or await auth.authenticate(metadata)
            auth.authorize(key, scope)
            if self.enforcer is not None and scope:
                ctx.rate = await self.enforcer.admit(key)
        except InferdError as error:
            if error.status_code != 429:  # the enforcer counts its own
                self.metrics.limit_rejections.labels(error.code).inc()
            raise
        ctx.key = key

    def _finish(self, ctx: RequestContext) -> None:
        elapsed = time.perf_counter() - ctx.started
        endpoint = ctx.endpoint or "unmatched"
        status = ctx.status or 499  # cancelled before any answer
        counter = self._children.get((endpoint, status))
        if counter is None:
            counter = self._children[(endpoint, status)] = self.metrics.requests.labels(
                endpoint, "GRPC", str(status)
            )
        counter.inc()
        duration = self._durations.get(endpoint)
        if duration is None:
            duration = self._durations[endpoint] = self.metrics.request_duration.labels(
                endpoint, "GRPC"
            )
        duration.observe(elapsed)
        if self.access_log.enabled:
            self.access_log.request(
                request_id=ctx.request_id,
                method="GRPC",
                path=endpoint,
                status_code=status,
                latency_ms=round(elapsed * 1000.0, 3),
                queue_depth=ctx.queue_depth,
                batch_size=ctx.batch_size,
                model=ctx.model,
                model_version=ctx.version,
                detail=ctx.detail,
            )

    # ------------------------------------------------------------------ the RPCs
    async def _server_live(self, request: Any, context: Any, ctx: RequestContext) -> Any:
        return pb.ServerLiveResponse(live=True)

    async def _server_ready(self, request: Any, context: Any, ctx: RequestContext) -> Any:
        return pb.ServerReadyResponse(ready=self.registry.ready)

    async def _server_metadata(self, request: Any, context: Any, ctx: RequestContext) -> Any:
        return pb.ServerMetadataResponse(name="inferd", version=__version__, extensions=EXTENSIONS)

    async def _model_ready(self, request: Any, context: Any, ctx: RequestContext) -> Any:
        ctx.model = request.name
        try:
            loaded = self.v2.known(request.name, request.version or None)
        except InferdError as exc:  # unknown, still loading: not ready, as Triton answers
            ctx.detail = exc.message
            return pb.ModelReadyResponse(ready=False)
        return pb.ModelReadyResponse(ready=loaded.ready)

    async def _model_metadata(self, request: Any, context: Any, ctx: RequestContext) -> Any:
        ctx.model = request.name
        doc = self.v2.model_metadata(request.name, request.version or None)
        response = pb.ModelMetadataResponse(
            name=doc["name"], versions=doc["versions"], platform=doc["platform"]
        )
        for field in ("inputs", "outputs"):
            for tensor in doc[field]:
                getattr(response, field).add(
                    name=tensor["name"], datatype=tensor["datatype"], shape=tensor["shape"]
                )
        return response

    async def _model_infer(self, request: Any, context: Any, ctx: RequestContext) -> Any:
        inbound = GrpcInbound(self.v2, ctx, request, context)
        return await self.plane.infer(inbound)

    async def _repository_index(self, request: Any, context: Any, ctx: RequestContext) -> Any:
        rows = await self.registry.index()
        if request.ready:
            rows = [row for row in rows if str(row.get("state", "")).upper() == "READY"]
        response = pb.RepositoryIndexResponse()
        for row in rows:
            response.models.add(
                name=str(row.get("name", "")),
                version=str(row.get("version", "")),
                state=str(row.get("state", "")),
                reason=str(row.get("reason") or ""),
            )
        return response

    async def _load(self, request: Any, context: Any, ctx: RequestContext) -> Any:
        ctx.model = request.model_name
        given = codec.parameters(request.parameters)
        if given:
            raise BadRequest(
                "inferd loads models from its repository folder; load parameters (config, "
                f"files) are not supported, got {', '.join(sorted(given))}"
            )
        await self.registry.load_model(request.model_name)
        return pb.RepositoryModelLoadResponse()

    async def _unload(self, request: Any, context: Any, ctx: RequestContext) -> Any:
        ctx.model = request.model_name
        await self.registry.unload_model(request.model_name)
        return pb.RepositoryModelUnloadResponse()


class GrpcInbound:
    """One ``ModelInfer`` call, as the data plane sees it."""

    __slots__ = ("_parsed", "_raw", "ctx", "model", "request", "timeout", "v2", "version")

    def __init__(self, v2: OpenInference, ctx: RequestContext, request: Any, context: Any) -> None:
        self.v2 = v2
        self.ctx = ctx
        self.request = request
        name = request.model_name
        if not name:
            raise BadRequest("model_name is required")
        ctx.model = name
        self.model: str | None = name
        self.version = _version(name, request.model_version)
        self.timeout = v2.timeout
        remaining = context.time_remaining()
        if remaining is not None:  # the call's gRPC deadline
            self.timeout = min(self.timeout, max(remaining, 0.0))
        self._parsed: InferRequest | None = None
        self._raw = False

    def accept(self, loaded: LoadedModel) -> None:
        require_tensors(loaded)

    async def read(self, loaded: LoadedModel) -> None:
        parsed, self._raw = codec.parse_request(self.request)
        self._parsed = parsed
        if parsed.id and parsed.id.isascii() and parsed.id.isprintable():
            self.ctx.request_id = parsed.id

    async def decode(
        self, loaded: LoadedModel, deadline: float, previous: Decoded[Any] | None
    ) -> Decoded[tuple[InferRequest, list[RequestedOutput]]]:
        assert self._parsed is not None
        return decode_infer(self._parsed, loaded, self.v2.max_instances)

    def disconnect_probe(self) -> Callable[[], bool] | None:
        return None  # a cancelled call cancels its handler: the data plane drops the request

    def watch(self, future: asyncio.Future[Any]) -> asyncio.Task[None] | None:
        return None

    def encode(
        self,
        loaded: LoadedModel,
        decoded: Decoded[tuple[InferRequest, list[RequestedOutput]]],
        output: FloatArray,
    ) -> Any:
        return codec.encode_response(
            loaded.name,
            loaded.version_str,
            decoded.meta[0].id,
            render_outputs(loaded, decoded, output),
            self._raw,
        )


# ---------------------------------------------------------------------------------- helpers
def _serialize(message: Any) -> bytes:
    data: bytes = message.SerializeToString()
    return data


def _metadata(context: Any) -> list[tuple[bytes, bytes]]:
    """The call's metadata as ASGI-style header pairs (what the key checks read)."""
    pairs = []
    for key, value in context.invocation_metadata() or ():
        raw = value if isinstance(value, bytes) else str(value).encode("latin-1", "replace")
        pairs.append((key.lower().encode("latin-1"), raw))
    return pairs


def _version(name: str, version: str) -> int | None:
    if not version:
        return None
    if not version.isdigit() or int(version) < 1:
        raise ModelNotFound(
            f"model {name!r} has no version {version!r}; versions are positive integers"
        )
    return int(version)
