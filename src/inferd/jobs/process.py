"""``inferd worker``: a process that only runs long-running requests.

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
from typing import Any

from inferd.jobs.events import create_event_bus
from inferd.jobs.runner import ModelExecutor
from inferd.jobs.sql import SqlStore
from inferd.jobs.worker import Worker
from inferd.logs import get_logger
from inferd.metrics import Metrics
from inferd.models.registry import ModelRegistry
from inferd.settings import Settings
from inferd.tenancy.enforce import Enforcer, settle_usage
from inferd.tenancy.limits import create_limiter
from inferd.tenancy.usage import UsageLedger

__all__ = ["run_worker"]

log = get_logger("inferd.worker")


async def run_worker(settings: Settings, concurrency: int, burst: bool = False) -> int:
    """Run until signalled (or, with ``burst``, until the queue is empty); return the count
    of jobs run."""
    from inferd.jobs.migrate import migrate

    registry = ModelRegistry(settings, Metrics())
    entries = registry.plan()
    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.auto_migrate:
        await migrate(settings.effective_database_url)
    store = SqlStore(
        settings.effective_database_url,
        backoff_base=settings.retry_base_seconds,
        backoff_max=settings.retry_max_seconds,
    )
    bus = create_event_bus(settings.redis_url)
    executor = ModelExecutor(registry, settings.max_instances)
    limiter = create_limiter(
        settings.redis_url, settings.limits_fail_open, timeout=settings.limits_timeout_seconds
    )
    ledger = UsageLedger(store.engine)
    enforcer = Enforcer(limiter, registry.metrics, ledger)

    async def settle(lease: Any, event: Any, chunks: list[Any]) -> None:
        await settle_usage(enforcer, executor, lease, event, chunks)

    worker = Worker(
        store,
        bus,
        executor,
        concurrency=concurrency,
        lease_seconds=settings.lease_seconds,
        heartbeat_seconds=settings.heartbeat_seconds,
        poll_seconds=settings.poll_seconds,
        on_terminal=settle,
    )
    loop = asyncio.get_running_loop()
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
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await registry.stop(grace=1.0)
        await ledger.flush()
        await limiter.close()
        await bus.close()
        await store.close()
