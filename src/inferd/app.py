"""Composition root: builds the ASGI app from settings.

request ─▶ RequestContextMiddleware (id, access log, request metrics)
         ─▶ HotPath (POST /predict, /v1/models/{name}/predict, /v2/models/{name}/infer)
         ─▶ FastAPI (health, metrics, metadata, docs, /v1/requests, its WebSockets)
gRPC call ─▶ GrpcServer (the Open Inference Protocol, same loop; with grpc_port set)

Long-running requests: RequestService (API side) and in-process Workers over one SqlStore
(SQLite by default, PostgreSQL to scale out) and an EventBus (in-process, or Redis).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI, Request

from inferd import tracing
from inferd.backends import Backends, prepare_database
from inferd.concurrency import run_blocking
from inferd.console import Stats, build_console_router
from inferd.errors import ConfigError, InferdError
from inferd.grpc.server import GrpcServer
from inferd.http.admin_api import build_admin_router
from inferd.http.api import build_api
from inferd.http.context import RequestContextMiddleware
from inferd.http.cors import cors
from inferd.http.drift_api import build_drift_router
from inferd.http.hotpath import HotPath
from inferd.http.openai_api import OpenAIErrorShape, build_openai_router
from inferd.http.openapi import install_contract
from inferd.http.peers import PeerRoutes, Peers
from inferd.http.requests_api import (
    LeanSubmit,
    build_dead_letter_router,
    build_requests_router,
)
from inferd.http.v2 import build_v2_router
from inferd.http.vision_api import VisionService, build_vision_router
from inferd.http.ws import build_requests_ws_router
from inferd.jobs.runner import ModelExecutor
from inferd.jobs.service import RequestService
from inferd.jobs.worker import Worker
from inferd.logs import AccessLog, get_logger
from inferd.metrics import Metrics
from inferd.models.registry import ModelRegistry
from inferd.models.runtimes import RuntimeOptions
from inferd.models.runtimes import configure as configure_runtimes
from inferd.models.storage import RemoteRepository, create_syncer
from inferd.monitoring import Monitor
from inferd.serving import DataPlane
from inferd.serving.cache import MemoryResults, RedisResults, ResultCache, ResultStore
from inferd.settings import Settings
from inferd.tenancy.auth import KEYS_CHANNEL, Authenticator
from inferd.tenancy.clients import AddressLimit
from inferd.tenancy.keys import KeyStore

__all__ = ["InferdApp", "create_app"]

log = get_logger("inferd.app")


class InferdApp:
    """The ASGI application of one inferd process, with handles on its parts."""

    def __init__(
        self,
        settings: Settings,
        on_fatal: Callable[[BaseException], None] | None = None,
        syncer: RemoteRepository | None = None,
        peers: Peers | None = None,
        limits_socket: str | None = None,
    ) -> None:
        self.settings = settings
        self.peers = peers  # the other processes of this server, if it has several
        self.metrics = Metrics()
        configure_runtimes(RuntimeOptions.from_settings(settings))  # device, threads
        self.registry = ModelRegistry(settings, self.metrics)
        # A bucket (model_repository) is mirrored into models_dir before it is read, at
        # start-up and whenever the registry reads the repository again.
        self.syncer = syncer if syncer is not None else create_syncer(settings)
        if self.syncer is not None:
            self.registry.syncer = self.syncer
        self.on_fatal = on_fatal
        # Drift and prediction monitoring: every answered batch is handed to the monitor.
        self.monitor = Monitor(settings, self.metrics) if settings.drift_enabled else None
        if self.monitor is not None:
            self.registry.observe = self.monitor.observe
        self._loader: asyncio.Task[None] | None = None
        self.backends = Backends.from_settings(settings, self.metrics, limits_socket)
        self.store, self.bus = self.backends.store, self.backends.bus
        self.limiter, self.ledger = self.backends.limiter, self.backends.ledger
        self.enforcer = self.backends.enforcer
        results: ResultStore = (
            RedisResults(settings.redis_url)
            if settings.result_cache == "redis" and settings.redis_url
            else MemoryResults(self.metrics)
        )
        # Every prediction goes through the data plane; [cache] models through the cache.
        self.plane = DataPlane(self.registry, self.enforcer, ResultCache(results, self.metrics))
        self.hot = HotPath(self.plane, settings)
        self.executor = ModelExecutor(
            self.registry, settings.max_instances, settings.lease_seconds, self.plane
        )
        self.worker: Worker | None = None
        if settings.workers > 0:
            self.worker = self.backends.worker(settings, self.executor, settings.workers)
        self.requests = RequestService(
            self.store,
            self.bus,
            self.executor,
            max_attempts=settings.max_attempts,
            keepalive=settings.sse_keepalive_seconds,
            on_submit=self.worker.wake if self.worker is not None else None,
            enforcer=self.enforcer,
            max_queued=settings.max_queued_requests or None,
            max_queued_per_key=settings.max_queued_requests_per_key or None,
            ttl_seconds=settings.request_ttl_seconds or None,
            retry_after=settings.retry_after_s,
            metrics=self.metrics,
        )
        self.hot.submit = LeanSubmit(self.requests, settings.max_body_bytes)
        self.maintenance = self.backends.maintenance(settings)
        self.api: FastAPI = build_api(self.registry, self.metrics, self._lifespan)
        self.api.include_router(
            build_requests_router(self.requests, settings.max_body_bytes, settings.sse_retry_ms)
        )
        # /v1/admin: load, unload, default, split
        self.api.include_router(build_admin_router(self.registry, self.plane.traffic))
        self.api.include_router(build_dead_letter_router(self.requests))  # /v1/admin/requests
        # Image classification: /v1/models/{name}/classify and /v1/predict.
        self.vision = VisionService(self.plane, settings, self.metrics)
        self.api.include_router(build_vision_router(self.vision))
        # The Open Inference Protocol (V2): the same registry, batchers and budgets.
        self.api.include_router(build_v2_router(self.plane, settings))
        # The OpenAI-compatible API of text models (/openai/v1), on continuous batching.
        self.api.include_router(build_openai_router(self.plane, settings))
        self.api.add_api_route(
            "/v1/usage",
            self._usage,
            methods=["GET"],
            tags=["tenancy"],
            summary="The caller's limits and what is left of them today",
        )
        self.stats = Stats(self.metrics)
        self.api.include_router(build_console_router(self.stats))  # /console, /v1/stats
        self.api.include_router(build_drift_router(self.registry, self.monitor))
        self._stats_task: asyncio.Task[None] | None = None
        self._monitor_task: asyncio.Task[None] | None = None
        self._worker_task: asyncio.Task[None] | None = None
        self.access_log = AccessLog(enabled=settings.access_log, level=settings.log_level)
        self.keys = KeyStore(self.store.engine)
        self.auth = (
            Authenticator(self.keys, settings.key_cache_seconds) if settings.auth_required else None
        )
        # Long-running requests over WebSocket: keys checked by the routes themselves (a
        # browser sends its key in the first message).
        self.api.include_router(
            build_requests_ws_router(
                self.requests, self.auth, self.enforcer, settings.max_body_bytes
            )
        )
        # /openapi.json says what the server answers: every status, error body and constraint.
        install_contract(
            self.api,
            self.registry,
            auth=self.auth is not None,
            max_instances=settings.max_instances,
        )
        # With several processes, /metrics, readiness, /v1/stats and the admin API speak for all.
        routes: Any = self.api
        if peers is not None:
            routes = PeerRoutes(self.api, peers, self.metrics.registry)
        by_address = None
        if settings.anonymous_rate is not None:  # requests without a key, per client address
            try:
                by_address = AddressLimit(
                    self.enforcer, settings.anonymous_rate, settings.trusted_proxies
                )
            except ValueError as exc:
                raise ConfigError(f"invalid settings: anonymous_rate: {exc}") from None
        self._context = RequestContextMiddleware(
            routes,
            self.metrics,
            self.access_log,
            fast=self.hot,
            auth=self.auth,
            enforcer=self.enforcer,
            by_address=by_address,
        )
        # /openai/ errors in OpenAI's shape, even a 401
        self._asgi: Any = OpenAIErrorShape(self._context)
        self.direct: Any = self._context
        """The hot routes for the connection protocol to serve as direct requests
        (:class:`inferd.http.protocol.DirectApp`); None where a wrapper must see every
        request (CORS)."""
        # The Open Inference Protocol over gRPC, started with the app in the same event loop.
        self.grpc: GrpcServer | None = None
        if settings.grpc_port is not None:
            self.grpc = GrpcServer(
                self.hot.v2,
                settings.host,
                settings.grpc_port,
                self.metrics,
                self.access_log,
                auth=self.auth,
                enforcer=self.enforcer,
            )
        if settings.cors_origins:  # outermost: preflights are answered before auth and routes
            self._asgi = cors(self._asgi, settings.cors_origins)
            self.direct = None
        self._flusher: asyncio.Task[None] | None = None
        self._counter: asyncio.Task[None] | None = None
        self._maintainer: asyncio.Task[None] | None = None
        self._revocations: asyncio.Task[None] | None = None
        self._repository_watch: asyncio.Task[None] | None = None
        self._ledger_task: asyncio.Task[None] | None = None
        self._tracing = False  # whether this app turned tracing on (and turns it off)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self._asgi(scope, receive, send)

    @contextlib.asynccontextmanager
    async def _lifespan(self, api: FastAPI) -> AsyncIterator[None]:
        self._context.clock = asyncio.get_running_loop().time  # the loop that serves
        if self.syncer is not None and self.syncer.last is None:  # `inferd serve` synced
            await run_blocking(self.syncer.sync)
        entries = self.registry.plan()  # a wrong repository fails start-up right here
        self._tracing = tracing.configure_from_env(self.settings.otel_endpoint)
        if self._tracing:
            log.info("tracing on", endpoint=tracing.endpoint(self.settings.otel_endpoint))
        try:
            await prepare_database(self.settings)
        except InferdError as exc:
            log.critical("start-up failed: the request store is not usable", detail=exc.message)
            if self.on_fatal is None:
                raise
            self.registry.failure = exc.message
            self.on_fatal(exc)  # the server stops with this message instead of a traceback
            entries = []
        loop = asyncio.get_running_loop()
        self._loader = loop.create_task(self._load(entries), name="model-loader")
        self._flusher = loop.create_task(self._flush_access_log(), name="access-log-flusher")
        self._counter = loop.create_task(self._watch_jobs(), name="job-counter")
        self._maintainer = loop.create_task(self.maintenance.run(), name="queue-maintenance")
        self._maintainer.add_done_callback(_watch("queue maintenance"))
        self._revocations = loop.create_task(self._watch_revocations(), name="key-revocations")
        self._ledger_task = loop.create_task(self.ledger.run(), name="usage-ledger")
        self._stats_task = loop.create_task(self.stats.run(), name="stats-sampler")
        self._stats_task.add_done_callback(_watch("stats sampler"))
        if self.monitor is not None:
            self._monitor_task = loop.create_task(self.monitor.run(), name="drift-monitor")
            self._monitor_task.add_done_callback(_watch("drift monitor"))
        if self.grpc is not None:
            try:
                await self.grpc.start()
            except Exception:
                await self._shutdown()
                raise
        try:
            yield
        finally:
            await self._shutdown()

    async def _shutdown(self) -> None:
        """Stop in stages: the gRPC server (calls in flight finish), background tasks, then
        workers (finish or hand back), then the batchers (drain), and only then the
        connections they all use."""
        if self.grpc is not None:
            await self.grpc.stop(grace=self.settings.shutdown_grace_seconds)
        for task in (self._stats_task, self._monitor_task):  # they keep nothing to finish
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        # The watchers query the store and the bus: they must be gone before those close,
        # or a query cut off mid-way can leave a task that never finishes.
        watchers = [
            t
            for t in (
                self._loader,
                self._counter,
                self._maintainer,
                self._revocations,
                self._repository_watch,
            )
            if t is not None
        ]
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
        if self.worker is not None:
            await self.worker.stop(grace=self.settings.shutdown_grace_seconds)
        if self._worker_task is not None:
            self._worker_task.cancel()
            await asyncio.gather(self._worker_task, return_exceptions=True)
        with contextlib.suppress(TimeoutError):  # copies to shadow versions still in flight
            await asyncio.wait_for(self.plane.shadow.drain(), 2.0)
        await self.registry.stop(grace=5.0)
        await self.plane.cache.close()
        self.vision.close()
        if self._ledger_task is not None:
            self._ledger_task.cancel()
            await asyncio.gather(self._ledger_task, return_exceptions=True)  # flushes once more
        await self.backends.close()
        log.info("stopped")
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)
        self.access_log.flush()
        self.metrics.deferred.fold()
        if self._tracing:  # export the spans still buffered
            self._tracing = False
            await run_blocking(tracing.shutdown)

    async def _usage(self, request: Request) -> dict[str, Any]:
        key = request.scope.get("inferd.key")
        if key is None:
            return {"user": "anonymous", "auth": "off", "rate": None, "daily_tokens": None}
        return await self.enforcer.usage(key)

    async def _watch_jobs(self) -> None:
        """Keep ``inference_jobs`` current (a gauge cannot await a query at scrape time)."""
        while True:
            try:
                for status, count in (await self.store.counts()).items():
                    self.metrics.jobs.labels(status).set(count)
            except Exception as exc:
                log.warning("could not count jobs", detail=repr(exc))
            await asyncio.sleep(5.0)

    async def _watch_revocations(self) -> None:
        """Forget cached keys as soon as any process says a key was revoked."""
        if self.auth is None:
            return
        while True:
            try:
                async for _ in self.bus.subscribe(KEYS_CHANNEL):
                    self.auth.clear()
            except Exception as exc:
                log.warning("key revocation feed interrupted", detail=repr(exc))
            await asyncio.sleep(1.0)

    def _start_worker(self) -> None:
        if self.worker is None:
            return
        task = asyncio.get_running_loop().create_task(self.worker.run(), name="worker")
        task.add_done_callback(_watch("in-process worker"))
        self._worker_task = task

    async def _load(self, entries: Any) -> None:
        if self.registry.failure:
            return
        try:
            await self.registry.load_all(entries)
        except InferdError as exc:
            self.registry.failure = exc.message
            log.critical("start-up failed: a model could not be loaded", detail=exc.message)
            if self.on_fatal is not None:
                self.on_fatal(exc)
        except Exception as exc:
            self.registry.failure = repr(exc)
            log.critical("start-up failed", detail=repr(exc), exc_info=exc)
            if self.on_fatal is not None:
                self.on_fatal(exc)
        else:
            self._start_worker()
            if self.settings.watch_repository:
                self._repository_watch = asyncio.get_running_loop().create_task(
                    self._watch_repository(), name="repository-watch"
                )
                self._repository_watch.add_done_callback(_watch("repository watch"))
            if self.settings.gc_freeze:
                gc.collect()
                gc.freeze()
            if self.settings.gc_threshold:
                gc.set_threshold(self.settings.gc_threshold, *gc.get_threshold()[1:])
            log.info("ready", models=self.registry.expected, default=self.registry.default_name)

    async def _watch_repository(self) -> None:
        """Load what changed in the served models' folders (``watch_repository``)."""
        while True:
            await asyncio.sleep(self.settings.watch_interval_seconds)
            try:
                await self.registry.poll_repository()
            except Exception as exc:  # a bad look (a folder half-copied) must not end the watch
                log.warning("repository watch: could not read the repository", detail=repr(exc))

    async def _flush_access_log(self) -> None:
        """Every 0.1 s: the access lines and the deferred metric observations."""
        while True:
            await asyncio.sleep(0.1)
            self.access_log.flush()
            self.metrics.deferred.fold()

    async def wait_ready(self, within: float = 30.0) -> None:
        """Wait until every model is ready (tests, benchmarks); raises if loading failed."""
        loop = asyncio.get_running_loop()
        end = loop.time() + within
        while not self.registry.ready:
            if self.registry.failure:
                raise RuntimeError(self.registry.failure)
            if loop.time() > end:
                raise TimeoutError("models did not become ready in time")
            await asyncio.sleep(0.01)


def _watch(what: str) -> Callable[[asyncio.Task[None]], None]:
    """A done-callback that says loudly when a background task dies."""

    def done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.critical(f"{what} died", detail=repr(task.exception()), exc_info=task.exception())

    return done


def create_app(
    settings: Settings | None = None,
    on_fatal: Callable[[BaseException], None] | None = None,
    syncer: RemoteRepository | None = None,
    peers: Peers | None = None,
    limits_socket: str | None = None,
) -> InferdApp:
    """Build the app; ``settings`` default to :meth:`Settings.load` (env, .env, TOML).
    ``syncer``: the remote repository's syncer when the caller has synced it already.
    ``peers`` and ``limits_socket``: this process's siblings and the limiter process, in a
    server of several processes (:mod:`inferd.server`)."""
    return InferdApp(
        settings if settings is not None else Settings.load(),
        on_fatal,
        syncer,
        peers,
        limits_socket,
    )
