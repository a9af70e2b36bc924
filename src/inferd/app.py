"""Composition root: builds the ASGI app from settings.

request ─▶ RequestContextMiddleware (id, access log, request metrics)
         ─▶ HotPath (POST /predict, /v1/models/{name}/predict)
         ─▶ FastAPI (health, metrics, metadata, docs)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import FastAPI

from inferd.errors import InferdError
from inferd.http.api import build_api
from inferd.http.context import RequestContextMiddleware
from inferd.http.hotpath import HotPath
from inferd.logs import AccessLog, get_logger
from inferd.metrics import Metrics
from inferd.models.registry import ModelRegistry
from inferd.settings import Settings

__all__ = ["InferdApp", "create_app"]

log = get_logger("inferd.app")


class InferdApp:
    """The ASGI application of one inferd process, with handles on its parts."""

    def __init__(
        self, settings: Settings, on_fatal: Callable[[BaseException], None] | None = None
    ) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.registry = ModelRegistry(settings, self.metrics)
        self.on_fatal = on_fatal
        self._loader: asyncio.Task[None] | None = None
        self.hot = HotPath(self.registry, settings)
        self.api: FastAPI = build_api(self.registry, self.metrics, self.hot, self._lifespan)
        self.access_log = AccessLog(enabled=settings.access_log, level=settings.log_level)
        self._asgi = RequestContextMiddleware(
            self.api, self.metrics, self.access_log, fast=self.hot
        )
        self._flusher: asyncio.Task[None] | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        await self._asgi(scope, receive, send)

    @contextlib.asynccontextmanager
    async def _lifespan(self, api: FastAPI) -> AsyncIterator[None]:
        entries = self.registry.plan()  # a wrong repository fails start-up right here
        loop = asyncio.get_running_loop()
        self._loader = loop.create_task(self._load(entries), name="model-loader")
        self._flusher = loop.create_task(self._flush_access_log(), name="access-log-flusher")
        try:
            yield
        finally:
            self._flusher.cancel()
            self.access_log.flush()
            if self._loader is not None and not self._loader.done():
                self._loader.cancel()
                await asyncio.gather(self._loader, return_exceptions=True)
            await self.registry.stop(grace=5.0)
            log.info("stopped")

    async def _load(self, entries: Any) -> None:
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
            if self.settings.gc_freeze:
                gc.collect()
                gc.freeze()
            log.info("ready", models=self.registry.expected, default=self.registry.default_name)

    async def _flush_access_log(self) -> None:
        while True:
            await asyncio.sleep(0.1)
            self.access_log.flush()

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


def create_app(
    settings: Settings | None = None, on_fatal: Callable[[BaseException], None] | None = None
) -> InferdApp:
    """Build the app; ``settings`` default to :meth:`Settings.load` (env, .env, TOML)."""
    return InferdApp(settings if settings is not None else Settings.load(), on_fatal)
