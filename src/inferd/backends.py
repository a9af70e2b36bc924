"""The backends of one process, chosen by settings: built one way for API and worker processes.

Each seam has an embedded backend and a scale-out one beside its interface; this module, above
:mod:`inferd.jobs` and :mod:`inferd.tenancy`, is the one place that picks between them: the
request store (SQLite or PostgreSQL, one :class:`~inferd.jobs.sql.SqlStore`), the event bus
(in-process or Redis) and the limiter (in-process or Redis).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from inferd.jobs.events import create_event_bus
from inferd.jobs.maintenance import Maintenance
from inferd.jobs.runner import ModelExecutor
from inferd.jobs.sql import SqlStore
from inferd.jobs.types import Event, EventBus
from inferd.jobs.usage import settle_usage, tokens_processed
from inferd.jobs.worker import Worker
from inferd.logs import AccessLog
from inferd.metrics import Metrics
from inferd.settings import Settings
from inferd.tenancy.enforce import Enforcer
from inferd.tenancy.limits import Clock, Limiter
from inferd.tenancy.limits_memory import MemoryLimiter
from inferd.tenancy.usage import UsageLedger

__all__ = ["Backends", "create_limiter", "prepare_database"]


def create_limiter(
    redis_url: str | None,
    fail_open: bool,
    clock: Clock = time.time,
    timeout: float = 1.0,
    limits_socket: str | None = None,
) -> Limiter:
    """A :class:`~inferd.tenancy.limits_redis.RedisLimiter` on ``redis_url`` when it is set
    (shared by every API process); else, in a server of several processes, a
    :class:`~inferd.tenancy.limits_socket.SocketLimiter` asking the server's limiter process at
    ``limits_socket``; else a :class:`MemoryLimiter` (``fail_open`` is moot). ``timeout``
    bounds each remote call; past it the call counts as an outage."""
    if redis_url:
        from inferd.tenancy.limits_redis import RedisLimiter

        return RedisLimiter(redis_url, fail_open=fail_open, clock=clock, timeout=timeout)
    if limits_socket:
        from inferd.tenancy.limits_socket import SocketLimiter

        return SocketLimiter(limits_socket, fail_open=fail_open, timeout=timeout, clock=clock)
    return MemoryLimiter(clock=clock)


async def prepare_database(settings: Settings) -> None:
    """Create the embedded database's folder and migrate the schema (if ``auto_migrate``)."""
    from inferd.db.migrate import migrate

    if settings.database_url is None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.auto_migrate:
        await migrate(settings.effective_database_url)


@dataclass
class Backends:
    """Store, event bus, limiter, usage ledger and limits of one process (no I/O to build)."""

    store: SqlStore
    bus: EventBus
    limiter: Limiter
    ledger: UsageLedger
    enforcer: Enforcer

    @classmethod
    def from_settings(
        cls, settings: Settings, metrics: Metrics, limits_socket: str | None = None
    ) -> Backends:
        """``limits_socket``: the limiter process of a server of several processes."""
        store = SqlStore(
            settings.effective_database_url,
            backoff_base=settings.retry_base_seconds,
            backoff_max=settings.retry_max_seconds,
            create_interval=settings.submit_interval_seconds,
        )
        limiter = create_limiter(
            settings.redis_url,
            settings.limits_fail_open,
            timeout=settings.limits_timeout_seconds,
            limits_socket=limits_socket,
        )
        ledger = UsageLedger(store.engine)
        return cls(
            store=store,
            bus=create_event_bus(settings.redis_url),
            limiter=limiter,
            ledger=ledger,
            enforcer=Enforcer(limiter, metrics, ledger),
        )

    def worker(self, settings: Settings, executor: ModelExecutor, concurrency: int) -> Worker:
        """A worker that counts its outcomes and settles the budgets of finished requests."""
        metrics = self.enforcer.metrics
        # Each job's observations are noted (a list append) and applied to the metrics at the
        # next fold (every 0.1 s, and before every scrape); a series' slot is kept.
        slots: dict[tuple[Any, ...], Callable[[float], None]] = {}

        def note(metric: Any, method: str, *labels: str) -> Callable[[float], None]:
            found = slots.get((metric, method, *labels))
            if found is None:
                apply = getattr(metric.labels(*labels), method)
                found = slots[metric, method, *labels] = metrics.deferred.slot(apply)
            return found

        def count(model: str, outcome: str, seconds: float) -> None:
            note(metrics.job_runs, "inc", model, outcome)(1)
            note(metrics.job_seconds, "observe", model)(seconds)

        async def settle(lease: Any, event: Any, chunks: list[Any]) -> None:
            processed = tokens_processed(executor, lease, event, chunks)
            note(metrics.tokens_processed, "inc", lease.model)(processed)
            await settle_usage(self.enforcer, executor, lease, event, chunks)
            if executor.registry.find(lease.model) is not None and (
                executor.jobs_options(lease.model).dedup
            ):
                # Requests that joined this one finish now, not at the next expiry round.
                for joined in await self.store.settle_joined():
                    await self.bus.publish(joined.request_id, joined.seq)

        return Worker(
            self.store,
            self.bus,
            executor,
            concurrency=concurrency,
            lease_seconds=settings.lease_seconds,
            heartbeat_seconds=settings.heartbeat_seconds,
            poll_seconds=settings.poll_seconds,
            claim_interval=settings.claim_interval_seconds,
            on_outcome=count,
            on_terminal=settle,
            # JSON lines (the default format) are noted and written in batches.
            lines=AccessLog(level=settings.log_level) if settings.log_format == "json" else None,
        )

    def maintenance(self, settings: Settings) -> Maintenance:
        """Expiry, joined requests and retention of the store, counted in the metrics; an
        expired request's budget reservation is released (it used nothing)."""
        metrics = self.enforcer.metrics

        async def expired(model: str, event: Event) -> None:
            metrics.jobs_expired.labels(model).inc()
            await self.enforcer.settle_request(event.request_id, model, 0, 0)

        return Maintenance(
            self.store,
            self.bus,
            expiry_interval=settings.expiry_interval_seconds,
            retention_days=settings.retention_days,
            retention_interval=settings.retention_interval_seconds,
            batch=settings.retention_batch_size,
            on_expired=expired,
            on_purged=metrics.requests_purged.inc,
        )

    async def close(self) -> None:
        """Flush the ledger and close the connections."""
        await self.ledger.flush()
        await self.bus.close()
        await self.limiter.close()
        await self.store.close()
