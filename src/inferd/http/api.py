"""FastAPI routes: health, metrics, model metadata, and the documented prediction routes."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from inferd import __version__
from inferd.errors import InferdError, ModelNotFound, ModelNotReady
from inferd.http.responses import documented_methods, error_body
from inferd.http.routes import LEAN_ROUTES, LeanRoute
from inferd.http.schemas import ERROR_RESPONSES, V2_ERROR_RESPONSES
from inferd.metrics import Metrics
from inferd.models.registry import ModelRegistry
from inferd.serving import ClientGone

__all__ = ["build_api"]

_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    415: "unsupported_media_type",
}


class _Unanswered(Response):
    """What a route returns for a client that has gone: nothing is sent (the access log says
    499)."""

    def __init__(self) -> None:
        super().__init__(status_code=499)

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        return None


_SERVER_READINESS = {
    "type": "object",
    "required": ["status", "models"],
    "properties": {
        "status": {"type": "string", "enum": ["ready", "not_ready"]},
        "models": {"type": "object", "additionalProperties": {"type": "string"}},
        "error": {"type": "string"},
    },
}
_MODEL_READINESS = {
    "type": "object",
    "required": ["name", "version", "ready"],
    "properties": {
        "name": {"type": "string"},
        "version": {"type": ["string", "null"]},
        "ready": {"type": "boolean"},
        "reason": {"type": "string"},
    },
}


def _answer(description: str, schema: dict[str, Any]) -> dict[str, Any]:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _error_response(error: InferdError) -> Response:
    return Response(
        error_body(error),
        status_code=error.status_code,
        media_type="application/json",
        headers=error.headers(),
    )


def build_api(registry: ModelRegistry, metrics: Metrics, lifespan: Any) -> FastAPI:
    """The FastAPI app for everything but the lean routes (which it documents)."""
    api = FastAPI(
        title="inferd",
        version=__version__,
        description=(
            "Serves machine-learning models over HTTP with micro-batching, load shedding and "
            'deadlines. Every error body is `{"error": {"code", "message", "retryable"}}`.'
        ),
        lifespan=lifespan,
    )

    @api.exception_handler(InferdError)
    async def _inferd_error(request: Request, exc: InferdError) -> Response:
        return _error_response(exc)

    @api.exception_handler(ClientGone)
    async def _client_gone(request: Request, exc: ClientGone) -> Response:
        ctx = request.scope.get("inferd")
        if ctx is not None:
            ctx.detail = "client disconnected; dropped before the model ran"
        return _Unanswered()

    @api.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> Response:
        first = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", ()))
        error = InferdError(f"{where}: {first.get('msg')}")
        error.status_code, error.code = 422, "validation_failed"
        return _error_response(error)

    @api.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        error = InferdError(
            f"{request.method} {request.url.path}: {exc.detail}"
            if exc.status_code in (404, 405)
            else str(exc.detail)
        )
        error.status_code = exc.status_code
        error.code = _STATUS_CODES.get(exc.status_code, "http_error")
        response = _error_response(error)
        if exc.headers:
            response.headers.update(exc.headers)
        if exc.status_code == 405:  # every method of the path, not only its first route's
            # FastAPI's cached document has the same paths, without a copy per request.
            allow = documented_methods(api.openapi_schema or api.openapi(), request.url.path)
            if allow:
                response.headers["allow"] = ", ".join(allow)
        return response

    # ------------------------------------------------------------------ health
    @api.get("/health", tags=["health"], summary="Liveness probe")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "version": __version__}

    @api.get("/health/live", tags=["health"], summary="Liveness: the process answers")
    async def live() -> dict[str, Any]:
        return {"status": "alive"}

    @api.get(
        "/health/ready",
        tags=["health"],
        summary="Readiness: every configured model is loaded and warmed up",
        responses={503: _answer("Not ready yet, or a model failed to load", _SERVER_READINESS)},
    )
    async def ready() -> Response:
        models = {
            name: (m.state.value if (m := registry.find(name)) else "pending")
            for name in registry.expected
        }
        is_ready = registry.ready
        body: dict[str, Any] = {"status": "ready" if is_ready else "not_ready", "models": models}
        if registry.failure:
            body["error"] = registry.failure
        return JSONResponse(body, status_code=200 if is_ready else 503)

    @api.get(
        "/metrics",
        tags=["observability"],
        summary="Prometheus metrics, in the Prometheus text exposition format",
        response_class=Response,
        responses={
            200: {
                "description": "The metrics of this process",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    )
    async def prometheus() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    # ------------------------------------------------------------------ models
    @api.get("/v1/models", tags=["models"], summary="Served models with their versions")
    async def list_models() -> dict[str, Any]:
        names = sorted({m.name for m in registry.all()})
        return {
            "default": registry.default_name,
            "models": [registry.describe(name) for name in names],
        }

    @api.get(
        "/v1/models/{name}",
        tags=["models"],
        summary="One model: its default version's metadata and every version's state",
    )
    async def get_model(name: str) -> dict[str, Any]:
        return registry.describe(name)

    @api.get(
        "/v1/models/{name}/versions/{version}",
        tags=["models"],
        summary="One version's metadata",
    )
    async def get_version(name: str, version: int) -> dict[str, Any]:
        for loaded in registry.all():
            if loaded.name == name and loaded.version == version:
                return loaded.describe()
        registry.get(name, version)  # raises, saying why
        raise ModelNotFound(f"model {name!r} has no version {version} loaded")

    @api.get(
        "/v1/models/{name}/ready",
        tags=["models"],
        summary="Readiness of a model's default version",
        responses={503: _answer("Loading, or not ready", _MODEL_READINESS)},
    )
    async def model_ready(name: str) -> Response:
        return _readiness(name, None)

    @api.get(
        "/v1/models/{name}/versions/{version}/ready",
        tags=["models"],
        summary="Readiness of one version",
        responses={503: _answer("Loading, or not ready", _MODEL_READINESS)},
    )
    async def version_ready(name: str, version: int) -> Response:
        return _readiness(name, version)

    def _readiness(name: str, version: int | None) -> Response:
        try:
            loaded = registry.get(name, version)
        except ModelNotReady as exc:
            body = {"name": name, "version": None if version is None else str(version)}
            return JSONResponse({**body, "ready": False, "reason": exc.message}, status_code=503)
        return JSONResponse({"name": name, "version": loaded.version_str, "ready": True})

    # ------------------------------------------------------------------ predictions
    # Answered on the lean path before FastAPI sees them; documented from the same table.
    for route in LEAN_ROUTES:
        v2 = route.protocol == "v2"
        api.add_api_route(
            route.path,
            _documented(route),
            methods=[route.method],
            tags=list(route.tags),
            summary=route.summary,
            response_model=route.response,
            responses={**V2_ERROR_RESPONSES, 200: _V2_BINARY} if v2 else ERROR_RESPONSES,
            openapi_extra={"requestBody": _body(route.request, binary=v2)},
        )

    return api


def _documented(route: LeanRoute) -> Callable[..., Any]:
    """A FastAPI endpoint that documents ``route`` (its path parameters included); the lean
    path answers before FastAPI would call it."""

    async def endpoint(request: Request, **_: Any) -> Response:
        if request.scope.get("inferd") is not None:
            # Served behind the middleware: the lean path saw the request and declined it, so
            # the path only looks like the route's (a version that is not decimal digits).
            raise ModelNotFound(
                f"{request.method} {request.url.path}: no such model version (a version is "
                "a whole number, in decimal digits)"
            )
        raise InferdError(
            f"{route.method} {route.path} is served by inferd's lean path; serve the InferdApp, "
            "not its FastAPI part alone"
        )

    endpoint.__signature__ = inspect.Signature(  # type: ignore[attr-defined]
        [
            inspect.Parameter(
                "request", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Request
            ),
            *(
                inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, annotation=kind)
                for name, kind in route.params.items()
            ),
        ]
    )
    endpoint.__name__ = route.path.strip("/").replace("/", "_").replace("{", "").replace("}", "")
    return endpoint


_BINARY_TENSORS = {
    "schema": {
        "type": "string",
        "format": "binary",
        "description": "The JSON document, then the binary tensors; the "
        "Inference-Header-Content-Length header gives the length of the JSON",
    }
}
_V2_BINARY = {
    "description": "The outputs; as the JSON document followed by binary tensors when any "
    "output is binary (Inference-Header-Content-Length says where the JSON ends)",
    "content": {"application/octet-stream": _BINARY_TENSORS},
}


def _body(model: type[Any], binary: bool = False) -> dict[str, Any]:
    content: dict[str, Any] = {"application/json": {"schema": _inlined(model.model_json_schema())}}
    if binary:
        content["application/octet-stream"] = _BINARY_TENSORS
    return {"required": True, "content": content}


def _inlined(schema: dict[str, Any]) -> dict[str, Any]:
    """``schema`` with its ``$defs`` written in place of their ``$ref``s: a request body given
    as ``openapi_extra`` is not one FastAPI moves into ``components``."""
    defs = schema.pop("$defs", {})

    def resolve(node: Any) -> Any:
        if isinstance(node, dict):
            ref = node.get("$ref")
            if isinstance(ref, str) and ref.startswith("#/$defs/"):
                return resolve(defs[ref.removeprefix("#/$defs/")])
            return {k: resolve(v) for k, v in node.items()}
        if isinstance(node, list):
            return [resolve(v) for v in node]
        return node

    resolved: dict[str, Any] = resolve(schema)
    return resolved
