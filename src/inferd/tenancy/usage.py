"""The usage ledger: tokens and requests per key, model and UTC day, in SQL, for billing.

Synchronous predictions are counted in memory and written in one upsert per key, model and
day every ``flush_seconds`` (a row per prediction would cost more than the prediction); at
most that much is lost if the process is killed. Long-running requests store their reserved
budget with the request (one transaction) and settle it when they end, with what they used.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import defaultdict
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncEngine

from inferd.db.schema import charges, usage
from inferd.logs import get_logger

__all__ = ["UsageLedger"]

log = get_logger("inferd.usage")


def _upsert(dialect: str) -> Any:
    if dialect == "postgresql":
        from sqlalchemy.dialects.postgresql import insert as pg_insert

        return pg_insert
    from sqlalchemy.dialects.sqlite import insert as sqlite_insert

    return sqlite_insert


class UsageLedger:
    """Counts usage and writes it to ``inferd_usage``."""

    def __init__(self, engine: AsyncEngine, flush_seconds: float = 2.0) -> None:
        self.engine = engine
        self.flush_seconds = flush_seconds
        self._pending: dict[tuple[str, str, str, str], list[int]] = defaultdict(lambda: [0, 0])
        self._lock = asyncio.Lock()

    def record(self, user: str, key_id: str, model: str, day: str, tokens: int) -> None:
        """Count one request of ``tokens`` (cheap: a dictionary update)."""
        entry = self._pending[(key_id, model, day, user)]
        entry[0] += 1
        entry[1] += tokens

    async def flush(self) -> None:
        """Write what was counted since the last flush."""
        async with self._lock:
            if not self._pending:
                return
            pending, self._pending = self._pending, defaultdict(lambda: [0, 0])
            stmt = _upsert(self.engine.dialect.name)(usage)
            stmt = stmt.on_conflict_do_update(
                index_elements=[usage.c.key_id, usage.c.model, usage.c.day],
                set_={
                    "requests": usage.c.requests + stmt.excluded.requests,
                    "tokens": usage.c.tokens + stmt.excluded.tokens,
                },
            )
            rows = [
                {"key_id": k, "model": m, "day": d, "user_id": u, "requests": n, "tokens": t}
                for (k, m, d, u), (n, t) in pending.items()
            ]
            try:
                async with self.engine.begin() as conn:
                    await conn.execute(stmt, rows)
            except Exception as exc:  # keep the counts for the next try
                log.warning("could not write usage", detail=repr(exc))
                for (k, m, d, u), (n, t) in pending.items():
                    entry = self._pending[(k, m, d, u)]
                    entry[0] += n
                    entry[1] += t

    async def run(self) -> None:
        """Flush every ``flush_seconds`` until cancelled (then once more)."""
        try:
            while True:
                await asyncio.sleep(self.flush_seconds)
                await self.flush()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(self.flush())

    async def today(self, key_id: str, day: str) -> dict[str, dict[str, int]]:
        """Usage of one key on ``day``, per model."""
        await self.flush()
        query = select(usage.c.model, usage.c.requests, usage.c.tokens).where(
            usage.c.key_id == key_id, usage.c.day == day
        )
        async with self.engine.connect() as conn:
            await conn.execution_options(inferd_read_only=True)
            result = await conn.execute(query)
            return {row.model: {"requests": row.requests, "tokens": row.tokens} for row in result}

    async def take(self, request_id: str) -> tuple[str, str, str, int] | None:
        """(key_id, user, day, reserved) of a request's reservation, removed; None if none."""
        async with self.engine.begin() as conn:
            row = (
                await conn.execute(select(charges).where(charges.c.request_id == request_id))
            ).first()
            if row is None:
                return None
            await conn.execute(delete(charges).where(charges.c.request_id == request_id))
            return row.key_id, row.user_id, row.day, row.reserved
