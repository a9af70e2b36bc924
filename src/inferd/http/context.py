"""Pure-ASGI middleware: request id, timing, access log and request metrics for every route.

``BaseHTTPMiddleware`` halves the throughput of the prediction path, so this is written
against ASGI directly. It puts a :class:`~inferd.serving.RequestContext` in
``scope["inferd"]``; handlers fill in what the access line should say (model, queue depth,
batch size, detail).
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from inferd import tracing
from inferd.errors import BadRequest, InferdError
from inferd.http.protocol import Direct
from inferd.http.responses import send_error
from inferd.logs import AccessLog, get_logger
from inferd.metrics import Metrics
from inferd.serving.context import RequestContext
from inferd.tenancy.auth import Authenticator, required_scope
from inferd.tenancy.clients import AddressLimit
from inferd.tenancy.enforce import Enforcer

__all__ = [
    "FastPath",
    "RequestContextMiddleware",
    "disconnect_probe",
    "incoming_id",
    "request_timeout",
    "watch_disconnect",
]

log = get_logger("inferd.http")

_MAX_ID = 128
_FOLD_EVERY = 256  # requests: the deferred metrics are folded at least this often
_UNMATCHED: Any = object()


class _RequestIds:
    """Unique ids without a random draw per request: a random process prefix and a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(6).hex()
        self._counter = itertools.count(1)

    def __call__(self) -> str:
        return f"{self._prefix}-{next(self._counter):x}"


def disconnect_probe(receive: Any) -> Callable[[], bool] | None:
    """``() -> bool`` telling whether the client has gone, read from uvicorn's request cycle
    (its ``disconnected`` flag, set when the connection is lost), or None elsewhere."""
    cycle = getattr(receive, "__self__", None)
    if type(cycle) is Direct:
        return cycle.gone
    if cycle is None or not isinstance(getattr(cycle, "disconnected", None), bool):
        return None
    return lambda: bool(cycle.disconnected)


def watch_disconnect(receive: Any, future: asyncio.Future[Any]) -> asyncio.Task[None]:
    """A task that cancels ``future`` when the client disconnects (for servers without the
    cheap probe of :func:`disconnect_probe`)."""

    async def watch() -> None:
        message = await receive()
        if message["type"] == "http.disconnect" and not future.done():
            future.cancel()

    return asyncio.get_running_loop().create_task(watch())


def request_timeout(value: str | bytes) -> float:
    """Seconds asked for by an ``X-Request-Timeout-Ms`` header (the client may only shorten
    the server's deadline); :class:`BadRequest` unless it is a positive number."""
    text = value.decode("latin-1") if isinstance(value, bytes) else value
    try:
        ms = float(text)
    except ValueError:
        ms = -1.0
    if not 0 < ms < 1e9:
        raise BadRequest(
            f"X-Request-Timeout-Ms must be a positive number of milliseconds, got {text!r}"
        )
    return ms / 1000.0


def incoming_id(headers: list[tuple[bytes, bytes]]) -> str | None:
    """The caller's ``X-Request-ID`` when it is printable ASCII of at most 128 characters."""
    for key, value in headers:
        if key == b"x-request-id":
            if 0 < len(value) <= _MAX_ID and value.isascii():
                text = value.decode("ascii")
                if text.isprintable():
                    return text
            return None
    return None


class FastPath(Protocol):
    """Routes answered without the framework (see :mod:`inferd.http.hotpath`)."""

    def match(self, scope: dict[str, Any]) -> Any | None:
        """What :meth:`serve` needs to answer the request if this path serves it, else None."""

    def serve(
        self, scope: dict[str, Any], receive: Any, send: Any, route: Any, ctx: RequestContext
    ) -> Awaitable[None]:
        """Answer the request (await it); set ``ctx.status`` and send ``x-request-id``."""


class _IdSender:
    """Adds ``x-request-id`` to the response and records its status in the context."""

    __slots__ = ("ctx", "send")

    def __init__(self, send: Any, ctx: RequestContext) -> None:
        self.send = send
        self.ctx = ctx

    async def __call__(self, message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            self.ctx.status = message["status"]
            headers = list(message.get("headers", ()))
            headers.append((b"x-request-id", self.ctx.request_id.encode()))
            if self.ctx.status != 429:  # a refusal carries its own
                headers.extend(self.ctx.rate_limit_headers())
            message = {**message, "headers": headers}
        await self.send(message)


class _TraceSender:
    """Returns ``traceparent`` (the request's span) and times the response's write."""

    __slots__ = ("send", "trace")

    def __init__(self, send: Any, trace: tracing.RequestTrace) -> None:
        self.send = send
        self.trace = trace

    async def __call__(self, message: dict[str, Any]) -> None:
        kind = message["type"]
        if kind == "http.response.start":
            self.trace.write_started = time.perf_counter()
            headers = list(message.get("headers", ()))
            headers.append((b"traceparent", self.trace.traceparent()))
            message = {**message, "headers": headers}
            await self.send(message)
            return
        await self.send(message)
        if kind == "http.response.body" and not message.get("more_body", False):
            self.trace.write_ended = time.perf_counter()


class RequestContextMiddleware:
    """Wraps the whole app: ``X-Request-ID`` in and out, access log, request metrics."""

    def __init__(
        self,
        app: Any,
        metrics: Metrics,
        access_log: AccessLog,
        fast: FastPath | None = None,
        auth: Authenticator | None = None,
        enforcer: Enforcer | None = None,
        by_address: AddressLimit | None = None,
    ) -> None:
        self.app = app
        self.by_address = by_address
        self.fast = fast
        self.auth = auth
        self.enforcer = enforcer
        self.metrics = metrics
        self.access_log = access_log
        self._new_id = _RequestIds()
        self._active = 0  # requests between their start and their access line
        self._children: dict[tuple[str, str, int], Any] = {}
        self._durations: dict[tuple[str, str], Any] = {}
        self._slot = metrics.deferred.slot
        self.clock: Callable[[], float] | None = None
        """The serving event loop's ``time`` (deadlines count on it); taken from the loop of
        the first request unless the app sets it at start-up."""
        self._since_fold = 0  # requests finished since the deferred metrics were last folded

    def match(self, scope: dict[str, Any]) -> Any | None:
        """The hot path's route of a request, or None (the connection protocol serves the
        hot routes as direct requests: :class:`inferd.http.protocol.DirectApp`)."""
        fast = self.fast
        return fast.match(scope) if fast is not None else None

    async def __call__(
        self, scope: dict[str, Any], receive: Any, send: Any, route: Any = _UNMATCHED
    ) -> None:
        """ASGI; ``route``: the hot path's route when the caller matched it already."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        request_id = incoming_id(scope["headers"]) or self._new_id()
        clock = self.clock
        if clock is None:  # (asyncio.get_running_loop() costs a getpid() system call)
            clock = self.clock = asyncio.get_running_loop().time
        ctx = RequestContext(request_id, started, clock())
        scope["inferd"] = ctx
        ctx.headers = scope["headers"]
        fast = self.fast
        if route is _UNMATCHED:
            route = fast.match(scope) if fast is not None else None
        if tracing.tracer is not None:  # off: nothing more than this check
            trace = ctx.trace = tracing.RequestTrace.server(
                scope["method"], scope["headers"], started
            )
            if route is None or getattr(route, "attach_trace", False):
                trace.attach()  # current for the routes under it (a job's submit stores it)
            send = _TraceSender(send, trace)
        self._active += 1
        try:
            if self.auth is not None:
                if not await self._admit(scope, send, ctx):
                    return
            elif self.by_address is not None and not await self._admit_address(scope, send, ctx):
                return
            if route is not None and fast is not None:
                # The hot path sets the status and the request-id header itself.
                await fast.serve(scope, receive, send, route, ctx)
            else:
                await self.app(scope, receive, _IdSender(send, ctx))
        except Exception as exc:
            log.exception("unhandled error", request_id=ctx.request_id, path=scope["path"])
            ctx.detail = f"unhandled {type(exc).__name__}"
            if not ctx.status:
                await send_with_id_error(_IdSender(send, ctx), ctx)
        finally:
            self._finish(scope, ctx)
            self._active -= 1
            if ctx.trace is not None:
                ctx.trace.detach()

    async def _admit(self, scope: dict[str, Any], send: Any, ctx: RequestContext) -> bool:
        """Authenticate and authorize; answer 401/403 and return False when refused."""
        auth = self.auth
        assert auth is not None
        needed = required_scope(scope["method"], scope["path"])
        if needed is None:
            return True
        try:
            key = auth.cached(scope["headers"]) or await auth.authenticate(scope["headers"])
            auth.authorize(key, needed)
            if self.enforcer is not None and needed:  # /v1/usage stays readable when limited
                enforcer = self.enforcer
                ctx.rate = (
                    enforcer.admit_now(key) if enforcer.immediate else await enforcer.admit(key)
                )
        except InferdError as error:
            if (
                error.status_code == 401
                and self.by_address is not None
                and not await self._admit_address(scope, send, ctx)
            ):
                return False  # no key: the address's limit refused it first
            ctx.detail = error.message
            if error.status_code != 429:  # the enforcer counts its own
                self.metrics.limit_rejections.labels(error.code).inc()
            await send_error(_IdSender(send, ctx), error)
            return False
        scope["inferd.key"] = key
        scope["inferd.user"] = key.user
        ctx.key = key
        return True

    async def _admit_address(self, scope: dict[str, Any], send: Any, ctx: RequestContext) -> bool:
        """The limit of requests without a key, per client address; answer 429 and return
        False when it is reached (public routes are not counted)."""
        assert self.by_address is not None
        if required_scope(scope["method"], scope["path"]) is None:
            return True
        try:
            ctx.rate = await self.by_address.admit(scope)
        except InferdError as error:
            ctx.detail = error.message
            await send_error(_IdSender(send, ctx), error)
            return False
        return True

    def _finish(self, scope: dict[str, Any], ctx: RequestContext) -> None:
        elapsed = time.perf_counter() - ctx.started
        method = scope["method"]
        endpoint = ctx.endpoint
        if endpoint is None:
            route = scope.get("route")
            endpoint = getattr(route, "path", None) or "unmatched"
        status = ctx.status or 499  # client went away before any answer
        key = (endpoint, method, status)
        counted = self._children.get(key)
        if counted is None:
            counted = self._children[key] = self._slot(
                self.metrics.requests.labels(endpoint, method, str(status)).inc
            )
        counted(1)
        dkey = (endpoint, method)
        duration = self._durations.get(dkey)
        if duration is None:
            duration = self._durations[dkey] = self._slot(
                self.metrics.request_duration.labels(endpoint, method).observe
            )
        duration(elapsed)
        trace = ctx.trace
        if trace is not None:
            ctx.end_trace(
                f"{method} {endpoint}",
                **{
                    "http.request.method": method,
                    "http.route": endpoint,
                    "url.path": scope["path"],
                    "http.response.status_code": status,
                },
            )
        if self.access_log.enabled:
            self.access_log.finished(ctx, method, scope["path"], status, elapsed)
        since = self._since_fold = self._since_fold + 1
        if self._active <= 1:
            # Alone: write the noted lines and observations now, while the client reads the
            # answer, instead of in a batch that a following request would wait behind.
            self.access_log.format()
            self._since_fold = 0
            self.metrics.deferred.fold()
        elif since >= _FOLD_EVERY:
            self._since_fold = 0
            self.metrics.deferred.fold()


async def send_with_id_error(send: Any, ctx: RequestContext) -> None:
    error = InferdError(f"internal server error; quote request id {ctx.request_id}")
    await send_error(send, error)
