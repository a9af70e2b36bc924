"""The periodic upkeep of the queue: expiry, joined requests, retention.

Every process that holds the store runs one :class:`Maintenance` (API and worker processes
alike); its statements are safe to run side by side (PostgreSQL's ``SKIP LOCKED``, SQLite's
write lock), so more processes only share the work.

* Every ``expiry_interval`` seconds: queued requests past their ``expires_at`` end
  ``expired`` (their followers get the terminal ``error`` event), and requests that joined an
  identical one which has ended are finished (or queued on their own).
* Every ``retention_interval`` seconds, when ``retention_days`` is set: finished requests
  older than that are deleted with their events, ``batch`` at a time. Each batch is its own
  short transaction with a pause after it, so workers' writes interleave with the deletion
  instead of waiting for all of it.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from inferd.jobs.types import Event, EventBus, QueueControls
from inferd.logs import get_logger

__all__ = ["Maintenance"]

log = get_logger("inferd.jobs.maintenance")

_BATCH = 100  # expired or joined requests ended per transaction
_DAY = 86_400.0


class Maintenance:
    """Expiry, joined requests and retention of one store, run by :meth:`run`."""

    def __init__(
        self,
        store: QueueControls,
        bus: EventBus,
        *,
        expiry_interval: float = 1.0,
        retention_days: float = 0.0,
        retention_interval: float = 300.0,
        batch: int = 500,
        pause: float = 0.05,
        on_expired: Callable[[str, Event], Awaitable[None]] | None = None,
        on_purged: Callable[[int], None] | None = None,
    ) -> None:
        if expiry_interval <= 0 or retention_interval <= 0 or batch < 1 or pause < 0:
            raise ValueError("intervals must be positive, batch at least 1, pause >= 0")
        self.store = store
        self.bus = bus
        self.expiry_interval = expiry_interval
        self.retention_days = retention_days
        self.retention_interval = retention_interval
        self.batch = batch
        self.pause = pause
        self.on_expired = on_expired
        self.on_purged = on_purged

    async def run(self) -> None:
        """Run both loops until cancelled; a failed round is logged and tried again."""
        loops = [self._every(self.expiry_interval, self.expire, "expiry")]
        if self.retention_days > 0:
            loops.append(self._every(self.retention_interval, self.purge, "retention"))
        await asyncio.gather(*loops)

    async def _every(self, interval: float, step: Callable[[], Awaitable[int]], name: str) -> None:
        while True:
            try:
                await step()
            except Exception as exc:  # the database may be down for a while: try again later
                log.warning(f"{name} round failed", detail=repr(exc))
            await asyncio.sleep(interval)

    async def expire(self) -> int:
        """End every due expiry and settle every joined request that can be; returns how
        many requests ended or changed."""
        changed = 0
        while True:
            expired = await self.store.expire_due(_BATCH)
            for model, event in expired:
                await self._publish(event)
                if self.on_expired is not None:
                    try:
                        await self.on_expired(model, event)
                    except Exception as exc:
                        log.warning("expiry hook failed", detail=repr(exc))
            joined = await self.store.settle_joined(_BATCH)
            for event in joined:
                await self._publish(event)
            changed += len(expired) + len({e.request_id for e in joined})
            if len(expired) < _BATCH and len({e.request_id for e in joined}) < _BATCH:
                return changed

    async def purge(self) -> int:
        """Delete every finished request older than ``retention_days``, a batch at a time;
        returns how many were deleted."""
        if self.retention_days <= 0:
            return 0
        deleted = 0
        while True:
            gone = await self.store.purge(self.retention_days * _DAY, self.batch)
            deleted += gone
            if gone and self.on_purged is not None:
                self.on_purged(gone)
            if gone < self.batch:
                if deleted:
                    log.info("retention: deleted old requests", requests=deleted)
                return deleted
            await asyncio.sleep(self.pause)  # let the workers' writes in

    async def _publish(self, event: Event) -> None:
        with contextlib.suppress(Exception):  # followers re-read the store; a lost wake-up
            await self.bus.publish(event.request_id, event.seq)  # only delays them
