"""``inferd worker``: the composition root of a process that only runs long-running requests.

It loads the models it serves, claims jobs from the shared database and writes their chunks
there, and wakes API processes through the event bus (Redis) so their SSE followers see the
chunks at once. SIGTERM stops claiming, lets running jobs finish within the grace period,
then hands the rest back to the queue without burning an attempt; a second signal exits now.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal

from inferd import tracing
from inferd.backends import Backends, prepare_database
from inferd.concurrency import run_blocking
from inferd.jobs.runner import ModelExecutor
from inferd.logs import get_logger
from inferd.metrics import Metrics
from inferd.models.registry import ModelRegistry
from inferd.settings import Settings

__all__ = ["run_worker"]

log = get_logger("inferd.worker")


async def run_worker(settings: Settings, concurrency: int, burst: bool = False) -> int:
    """Run until signalled (or, with ``burst``, until the queue is empty); return the count
    of jobs run."""
    metrics = Metrics()
    exporter = None
    if settings.worker_metrics_port:
        from prometheus_client import start_http_server

        # A thread of its own: a scrape never waits for the event loop, nor slows it.
        exporter, _ = start_http_server(
            settings.worker_metrics_port, settings.host, metrics.registry
        )
        log.info("serving metrics", url=f"http://{settings.host}:{settings.worker_metrics_port}")
    try:
        return await _run(settings, metrics, concurrency, burst)
    finally:
        if exporter is not None:
            exporter.shutdown()
            exporter.server_close()


async def _run(settings: Settings, metrics: Metrics, concurrency: int, burst: bool) -> int:
    registry = ModelRegistry(settings, metrics)
    entries = registry.plan()
    traced = tracing.configure_from_env(settings.otel_endpoint)
    await prepare_database(settings)
    backends = Backends.from_settings(settings, registry.metrics)
    executor = ModelExecutor(registry, settings.max_instances, settings.lease_seconds)
    worker = backends.worker(settings, executor, concurrency)
    loop = asyncio.get_running_loop()
    maintainer = loop.create_task(backends.maintenance(settings).run(), name="queue-maintenance")
    folder = loop.create_task(metrics.deferred.run(), name="metrics-fold")
    stopping = asyncio.Event()
    signals = 0

    def on_signal() -> None:
        nonlocal signals
        signals += 1
        if signals > 1:
            log.warning("second signal: exiting now")
            os._exit(1)
        log.info("stopping: finishing running jobs", grace=settings.shutdown_grace_seconds)
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    try:
        await registry.load_all(entries)
        if settings.gc_freeze:
            gc.collect()
            gc.freeze()
        if settings.gc_threshold:  # as the API's (see Settings.gc_threshold)
            gc.set_threshold(settings.gc_threshold, *gc.get_threshold()[1:])
        if burst:
            return await worker.run_burst()
        runner = loop.create_task(worker.run(), name="worker")
        await stopping.wait()
        await worker.stop(grace=settings.shutdown_grace_seconds)
        runner.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await runner
        return worker.processed
    finally:
        maintainer.cancel()
        folder.cancel()
        await asyncio.gather(maintainer, folder, return_exceptions=True)
        metrics.deferred.fold()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await registry.stop(grace=1.0)
        await backends.close()
        if traced:  # export the spans still buffered
            await run_blocking(tracing.shutdown)
