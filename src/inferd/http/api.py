"""FastAPI routes: health, metrics, model metadata, and the documented prediction routes."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from inferd import __version__
from inferd.errors import InferdError, ModelNotFound, ModelNotReady
from inferd.http.context import RequestContext
from inferd.http.hotpath import DEFAULT_ROUTE, HotPath
from inferd.http.responses import error_body
from inferd.http.schemas import (
    ERROR_RESPONSES,
    ModelPredictRequest,
    ModelPredictResponse,
    PredictRequest,
    PredictResponse,
)
from inferd.metrics import Metrics
from inferd.models.registry import ModelRegistry

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


class _Passthrough(Response):
    """Lets a FastAPI route hand the raw ASGI exchange to the hot path."""

    def __init__(self, serve: Any) -> None:
        self._serve = serve
        self.background = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._serve(scope, receive, send)


def _error_response(error: InferdError) -> Response:
    return Response(
        error_body(error),
        status_code=error.status_code,
        media_type="application/json",
        headers=error.headers(),
    )


def build_api(
    registry: ModelRegistry, metrics: Metrics, hot: HotPath | None, lifespan: Any
) -> FastAPI:
    """The FastAPI app for everything but the hot path (which it documents)."""
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
        responses={503: {"description": "Not ready yet, or a model failed to load"}},
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

    @api.get("/metrics", tags=["observability"], summary="Prometheus metrics")
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
        responses={503: {"description": "Loading, or not ready"}},
    )
    async def model_ready(name: str) -> Response:
        return _readiness(name, None)

    @api.get(
        "/v1/models/{name}/versions/{version}/ready",
        tags=["models"],
        summary="Readiness of one version",
        responses={503: {"description": "Loading, or not ready"}},
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
    # Served by the hot path before FastAPI sees them; declared here for the OpenAPI schema,
    # and working through the same code if reached (the hot path can be left out).
    if hot is not None:

        def passthrough(route: str) -> _Passthrough:
            async def serve(scope: Scope, receive: Receive, send: Send) -> None:
                ctx = scope.get("inferd") or RequestContext("-", time.perf_counter(), 0.0)
                if not ctx.started_loop:
                    ctx.started_loop = asyncio.get_running_loop().time()
                await hot.serve(dict(scope), receive, send, route, ctx, add_id=False)

            return _Passthrough(serve)

        @api.post(
            "/predict",
            tags=["predict"],
            summary="Predict with the default model",
            response_model=PredictResponse,
            responses=ERROR_RESPONSES,
            openapi_extra={"requestBody": _body(PredictRequest)},
        )
        async def predict(request: Request) -> Response:
            return passthrough(DEFAULT_ROUTE)

        @api.post(
            "/v1/models/{name}/predict",
            tags=["predict"],
            summary="Predict with a named model; one row or a batch of rows",
            response_model=ModelPredictResponse,
            responses=ERROR_RESPONSES,
            openapi_extra={"requestBody": _body(ModelPredictRequest)},
        )
        async def model_predict(name: str, request: Request) -> Response:
            return passthrough(name)

        @api.post(
            "/v1/models/{name}/versions/{version}/predict",
            tags=["predict"],
            summary="Predict with one version of a model; one row or a batch of rows",
            response_model=ModelPredictResponse,
            responses=ERROR_RESPONSES,
            openapi_extra={"requestBody": _body(ModelPredictRequest)},
        )
        async def version_predict(name: str, version: int, request: Request) -> Response:
            return passthrough(f"{name}/{version}")

    return api


def _body(model: type[Any]) -> dict[str, Any]:
    return {
        "required": True,
        "content": {"application/json": {"schema": model.model_json_schema()}},
    }
