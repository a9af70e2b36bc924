"""The prediction routes as plain ASGI, in front of FastAPI.

``POST /predict``, ``POST /v1/models/{name}/predict`` and
``POST /v1/models/{name}/versions/{version}/predict`` (the table in :mod:`inferd.http.routes`)
are answered here without the framework: routes matched by string checks, hand-written JSON
validation (:mod:`inferd.codec`), orjson, and the data plane for everything else (admission,
deadline, budget, batcher). The Open Inference Protocol's ``infer`` routes are in the same
table, answered by :meth:`inferd.http.v2.OpenInference.serve_infer`. FastAPI only documents
them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import orjson

from inferd.codec import ParsedRequest, parse_predict, render_rows
from inferd.errors import InferdError, UnsupportedMediaType, ValidationFailed
from inferd.http.body import check_length, read_body, whole_body
from inferd.http.context import disconnect_probe, request_timeout, watch_disconnect
from inferd.http.responses import error_body, send_answer
from inferd.http.routes import LEAN_ROUTES, match_lean
from inferd.http.v2 import OpenInference
from inferd.models.registry import LoadedModel
from inferd.serving import ClientGone, DataPlane, Decoded, RequestContext
from inferd.settings import Settings

__all__ = ["HotPath"]

_DEFAULT_ENDPOINT = LEAN_ROUTES[0].path
_JSON = (b"content-type", b"application/json")


class HotPath:
    """The lean prediction routes (see :class:`~inferd.http.context.FastPath`)."""

    def __init__(self, plane: DataPlane, settings: Settings) -> None:
        self.plane = plane
        self.max_body = settings.max_body_bytes
        self.max_instances = settings.max_instances
        self.timeout = settings.request_timeout_ms / 1000.0
        self.v2 = OpenInference(plane, settings)
        self.submit: Any = None
        """``POST /v1/requests`` at the ASGI level (:class:`~inferd.http.requests_api.LeanSubmit`),
        once the app has its request service."""

    def match(self, scope: dict[str, Any]) -> Any:
        if scope["method"] != "POST":
            return None
        path = scope["path"]
        submit = self.submit
        if submit is not None and path == submit.path:
            return submit
        return match_lean("POST", path)

    def serve(
        self,
        scope: dict[str, Any],
        receive: Any,
        send: Any,
        route: Any,
        ctx: RequestContext,
    ) -> Awaitable[None]:
        """Answer one prediction request (await it): the coroutine of its protocol's route,
        without one of this method's own; or a long-running request's submit."""
        if route is self.submit:
            ctx.endpoint = route.path
            return route.serve(scope, receive, send, ctx)  # type: ignore[no-any-return]
        lean, params = route
        ctx.endpoint = lean.path
        if lean.protocol == "v2":
            return self.v2.serve_infer(scope, receive, send, params, ctx)
        return self._predict(scope, receive, send, params, ctx, lean.path == _DEFAULT_ENDPOINT)

    async def _predict(
        self,
        scope: dict[str, Any],
        receive: Any,
        send: Any,
        params: dict[str, Any],
        ctx: RequestContext,
        default: bool,
    ) -> None:
        """Answer one ``/predict`` or ``/v1/models/...`` prediction request."""
        inbound = PredictInbound(self, ctx, scope, receive, params, default)
        try:
            body = await self.plane.infer(inbound)
            status, headers = 200, [_JSON]
        except ClientGone:
            ctx.detail = "client disconnected; dropped before the model ran"
            return
        except InferdError as error:
            ctx.detail = error.message
            status, body = error.status_code, error_body(error)
            headers = [_JSON, *((k.encode(), v.encode()) for k, v in error.headers().items())]
        await send_answer(send, ctx, status, headers, body)


class PredictInbound:
    """One JSON prediction request of the lean routes, as the data plane sees it."""

    __slots__ = (
        "_body",
        "ctx",
        "default",
        "hot",
        "model",
        "receive",
        "scope",
        "timeout",
        "version",
    )

    def __init__(
        self,
        hot: HotPath,
        ctx: RequestContext,
        scope: dict[str, Any],
        receive: Any,
        params: dict[str, Any],
        default: bool,
    ) -> None:
        self.hot = hot
        self.ctx = ctx
        self.scope = scope
        self.receive = receive
        self.default = default
        self.model: str | None = params.get("name")
        self.version: int | None = params.get("version")
        self.timeout = hot.timeout
        self._body = b""

    def accept(self, loaded: LoadedModel) -> None:
        if loaded.batcher is None:
            raise ValidationFailed(
                f"model {loaded.name!r} generates text; submit it with POST /v1/requests and "
                "follow its events"
            )
        if loaded.takes_images:
            raise ValidationFailed(
                f"model {loaded.name!r} takes images; POST one to "
                f"/v1/models/{loaded.name}/classify (raw body or multipart)"
            )

    async def read(self, loaded: LoadedModel) -> None:
        content_type = b""
        length = None
        for key, value in self.scope["headers"]:
            if key == b"content-type":
                content_type = value
            elif key == b"content-length":
                length = value
            elif key == b"x-request-timeout-ms":
                self.timeout = min(self.timeout, request_timeout(value))
        if content_type != b"application/json" and not _is_json_type(content_type):
            raise UnsupportedMediaType(
                f"Content-Type must be application/json, got {content_type.decode('latin-1')!r}"
                if content_type
                else "Content-Type must be application/json"
            )
        limit = self.hot.max_body
        check_length(length, limit)
        message = await self.receive()
        body = whole_body(message, limit)
        self._body = body if body is not None else await read_body(self.receive, limit, message)

    async def decode(
        self, loaded: LoadedModel, deadline: float, previous: Decoded[Any] | None
    ) -> Decoded[ParsedRequest]:
        parsed = parse_predict(
            self._body,
            loaded.n_features,
            loaded.spec.input.features,
            self.hot.max_instances,
            not self.default,
        )
        if parsed.request_id is not None:
            self.ctx.request_id = parsed.request_id
        return Decoded(parsed.rows, parsed.rows.shape[0], parsed)

    def disconnect_probe(self) -> Callable[[], bool] | None:
        return disconnect_probe(self.receive)

    def watch(self, future: Any) -> Any:
        return watch_disconnect(self.receive, future)

    def encode(self, loaded: LoadedModel, decoded: Decoded[ParsedRequest], output: Any) -> bytes:
        parsed, ctx = decoded.meta, self.ctx
        if self.default:  # one row, and only its prediction and confidence are sent
            classes = loaded.classes
            prediction: int | str | float
            confidence: float | None
            if loaded.spec.task == "classification" and classes is not None:
                k = int(output[0].argmax())
                prediction, confidence = classes[k], float(output[0, k])
            else:
                prediction, confidence = float(output.reshape(-1)[0]), None
            payload: dict[str, Any] = {
                "prediction": prediction,
                "confidence": confidence,
                "model_version": loaded.version_str,
                "request_id": ctx.request_id,
            }
            return orjson.dumps(payload)
        results = render_rows(output, loaded.spec.task, loaded.classes, loaded.labels)
        if parsed.batch:
            payload = {
                "model": loaded.name,
                "model_version": loaded.version_str,
                "predictions": results,
                "request_id": ctx.request_id,
            }
        else:
            payload = {
                "model": loaded.name,
                "model_version": loaded.version_str,
                **results[0],
                "request_id": ctx.request_id,
            }
        return orjson.dumps(payload)


def _is_json_type(value: bytes) -> bool:
    return value.split(b";", 1)[0].strip().lower() == b"application/json"
