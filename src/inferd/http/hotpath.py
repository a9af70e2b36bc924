"""The prediction hot path as plain ASGI, in front of FastAPI.

``POST /predict``, ``POST /v1/models/{name}/predict`` and
``POST /v1/models/{name}/versions/{version}/predict`` are answered here without the
framework: route by string checks, admission before the body is read, hand-written JSON
validation, the batcher, orjson. FastAPI documents these routes in its OpenAPI schema and,
if a request reaches it (the hot path can be bypassed), serves them through this same code.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import orjson

from inferd.batching import Batcher
from inferd.codec import parse_predict, render_rows
from inferd.errors import (
    BadRequest,
    DeadlineExceeded,
    InferdError,
    PayloadTooLarge,
    UnsupportedMediaType,
    ValidationFailed,
)
from inferd.http.context import ClientGone, RequestContext, disconnect_probe, request_timeout
from inferd.http.responses import error_body
from inferd.models.registry import LoadedModel, ModelRegistry, ModelState
from inferd.settings import Settings
from inferd.tenancy.enforce import Enforcer

__all__ = ["DEFAULT_ROUTE", "HotPath"]

DEFAULT_ROUTE = ""  # route key of POST /predict: not a valid model name
_PREFIX = "/v1/models/"
_SUFFIX = "/predict"
_DEFAULT_ENDPOINT = "/predict"
_MODEL_ENDPOINT = "/v1/models/{name}/predict"
_VERSIONS = "/versions/"
_VERSION_ENDPOINT = "/v1/models/{name}/versions/{version}/predict"
_JSON = (b"content-type", b"application/json")


class HotPath:
    """The lean prediction routes (see :class:`~inferd.http.context.FastPath`)."""

    def __init__(
        self, registry: ModelRegistry, settings: Settings, enforcer: Enforcer | None = None
    ) -> None:
        self.registry = registry
        self.enforcer = enforcer
        self.max_body = settings.max_body_bytes
        self.max_instances = settings.max_instances
        self.timeout = settings.request_timeout_ms / 1000.0

    def match(self, scope: dict[str, Any]) -> str | None:
        if scope["method"] != "POST":
            return None
        path: str = scope["path"]
        if path == _DEFAULT_ENDPOINT:
            return DEFAULT_ROUTE
        if path.startswith(_PREFIX) and path.endswith(_SUFFIX):
            name = path[len(_PREFIX) : -len(_SUFFIX)]
            if name and "/" not in name:
                return name
            # route key "name/version": a model name never holds a slash
            model, versions, version = name.partition(_VERSIONS)
            if versions and model and "/" not in model and version.isascii() and version.isdigit():
                return f"{model}/{int(version)}"
        return None

    async def serve(
        self,
        scope: dict[str, Any],
        receive: Any,
        send: Any,
        route: str,
        ctx: RequestContext,
        add_id: bool = True,
    ) -> None:
        """Answer one prediction request; ``route`` is a model name, ``name/version`` or
        :data:`DEFAULT_ROUTE`."""
        if route == DEFAULT_ROUTE:
            ctx.endpoint = _DEFAULT_ENDPOINT
        else:
            ctx.endpoint = _VERSION_ENDPOINT if "/" in route else _MODEL_ENDPOINT
        try:
            status, body, extra = await self._answer(scope, receive, route, ctx)
        except ClientGone:
            ctx.detail = "client disconnected; dropped before the model ran"
            return
        except InferdError as error:
            ctx.detail = error.message
            status, body = error.status_code, error_body(error)
            extra = [(k.encode(), v.encode()) for k, v in error.headers().items()]
        headers = [_JSON, (b"content-length", b"%d" % len(body)), *extra]
        if status != 429 and (ctx.rate is not None or ctx.quota is not None):
            headers.extend(ctx.rate_limit_headers())
        if add_id:
            headers.append((b"x-request-id", ctx.request_id.encode()))
        ctx.status = status
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _answer(
        self, scope: dict[str, Any], receive: Any, route: str, ctx: RequestContext
    ) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        loaded = self._lookup(route)
        batcher = loaded.batcher
        ctx.model, ctx.version = loaded.name, loaded.version_str
        if batcher is None:
            raise ValidationFailed(
                f"model {loaded.name!r} generates text; submit it with POST /v1/requests and "
                "follow its events"
            )
        if loaded.spec.takes_images:
            raise ValidationFailed(
                f"model {loaded.name!r} takes images; POST one to "
                f"/v1/models/{loaded.name}/classify (raw body or multipart)"
            )
        batcher.check_admission()  # shed before reading the body

        timeout = self.timeout
        content_type = b""
        length = -1
        for key, value in scope["headers"]:
            if key == b"content-type":
                content_type = value
            elif key == b"content-length":
                try:
                    length = int(value)
                except ValueError:
                    raise BadRequest("Content-Length is not a number") from None
            elif key == b"x-request-timeout-ms":
                timeout = min(timeout, request_timeout(value))
        if content_type != b"application/json" and not _is_json_type(content_type):
            raise UnsupportedMediaType(
                f"Content-Type must be application/json, got {content_type.decode('latin-1')!r}"
                if content_type
                else "Content-Type must be application/json"
            )
        if length > self.max_body:
            raise PayloadTooLarge(
                f"request body of {length} bytes is over the limit of {self.max_body} bytes"
            )
        body = await self._read_body(receive)
        spec = loaded.spec
        parsed = parse_predict(
            body, spec.n_features, spec.input.features, self.max_instances, route != DEFAULT_ROUTE
        )
        quota = None
        if ctx.key is not None and self.enforcer is not None:
            quota = ctx.quota = await self.enforcer.charge(ctx.key, parsed.rows.shape[0], ctx.rate)
        ctx.queue_depth = batcher.depth
        if parsed.request_id is not None:
            ctx.request_id = parsed.request_id
        rows = parsed.rows
        try:
            if loaded.state is not ModelState.READY:
                # Swapped out for a new version while this request was read: the old one is
                # draining and takes nothing more, so go to what serves now.
                loaded = self._lookup(route)
                batcher = loaded.batcher or batcher
                ctx.version = loaded.version_str
            output = await self._infer(
                loaded, batcher, rows, rows.shape[0], ctx.started_loop + timeout, receive, ctx
            )
        except (InferdError, ClientGone):
            if quota is not None and self.enforcer is not None:
                await self.enforcer.refund(ctx.key, quota)  # not served, not charged
            raise
        if quota is not None and self.enforcer is not None:
            self.enforcer.record(ctx.key, loaded.name, quota.day, rows.shape[0])

        results = render_rows(output, spec.task, loaded.classes, loaded.labels)
        children = loaded.metrics_children
        observe = children["prediction"].observe
        for row in results:
            confidence = row["confidence"]
            observe(confidence if confidence is not None else row["prediction"])
        if route == DEFAULT_ROUTE:
            row = results[0]
            payload: dict[str, Any] = {
                "prediction": row["prediction"],
                "confidence": row["confidence"],
                "model_version": loaded.version_str,
                "request_id": ctx.request_id,
            }
        elif parsed.batch:
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
        children["latency"].observe(time.perf_counter() - ctx.started)
        return 200, orjson.dumps(payload), []

    def _lookup(self, route: str) -> LoadedModel:
        if route == DEFAULT_ROUTE:
            return self.registry.get_default()
        name, _, version = route.partition("/")
        return self.registry.get(name, int(version) if version else None)

    async def _infer(
        self,
        loaded: LoadedModel,
        batcher: Batcher[Any, Any],
        rows: Any,
        n: int,
        deadline: float,
        receive: Any,
        ctx: RequestContext,
    ) -> Any:
        """Queue the rows and wait for the batch; the batcher fails the future at the deadline.

        A request whose client disconnects is dropped before the model runs it. Under uvicorn
        the batcher asks the connection directly (no cost per request); under another server,
        a request that will not make the next batch gets a task that waits for the disconnect.
        """
        gone = disconnect_probe(receive)
        watch = None
        if gone is None and (batcher.depth >= batcher.max_batch_size or batcher.running):
            future = batcher.submit(rows, n, deadline)
            watch = asyncio.get_running_loop().create_task(_watch(receive, future))
        else:
            future = batcher.submit(rows, n, deadline, gone)
        try:
            output, batch_rows = await future
        except DeadlineExceeded:
            loaded.metrics_children["timeouts"].inc()
            ctx.detail = "deadline exceeded"
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if future.cancelled() and task is not None and not task.cancelling():
                loaded.metrics_children["disconnects"].inc()
                raise ClientGone from None
            raise
        finally:
            if watch is not None:
                watch.cancel()
            if not future.done():
                future.cancel()
        ctx.batch_size = batch_rows
        return output

    async def _read_body(self, receive: Any) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise ClientGone
            chunk = message.get("body", b"")
            if chunk:
                size += len(chunk)
                if size > self.max_body:
                    raise PayloadTooLarge(
                        f"request body is over the limit of {self.max_body} bytes"
                    )
                chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)


async def _watch(receive: Any, future: asyncio.Future[Any]) -> None:
    """Cancel ``future`` when the client disconnects."""
    message = await receive()
    if message["type"] == "http.disconnect" and not future.done():
        future.cancel()


def _is_json_type(value: bytes) -> bool:
    return value.split(b";", 1)[0].strip().lower() == b"application/json"
