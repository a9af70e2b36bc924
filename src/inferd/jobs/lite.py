"""A worker's group write on SQLite, as one hand-off to a thread.

aiosqlite runs each call on a SQLite connection in a thread of its own, and SQLAlchemy makes
several calls per statement (open a cursor, execute, fetch, close): the group write of
:meth:`inferd.jobs.sql.SqlStore.write` (BEGIN IMMEDIATE, lock check, seqs, updates, inserts,
COMMIT) crossed between the event loop and that thread some twenty times. Each crossing
waits for a turn of the event loop, which in the embedded default is also serving HTTP: at
300 submits/s a streamed chunk's transaction took 20-30 ms, against ~4 ms for the same
write on PostgreSQL. The statements themselves take microseconds.

:class:`LiteWriter` runs the whole transaction in one call on a thread that owns a
connection of its own: the same statements in plain SQL, one hand-off there and one back.
Writers of the store's process still take its asyncio write lock first (see
:class:`inferd.jobs.sql.SqlStore`), so this connection never waits for another writer of
the process; other processes' writers are waited for in SQLite's busy timeout, as with
aiosqlite.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from inferd.db.schema import events, jobs, requests
from inferd.errors import StoreUnavailable
from inferd.jobs.rows import iso, to_datetime
from inferd.jobs.types import Event, EventKind, JobWrite, RequestStatus

__all__ = ["LiteWriter"]

_RUNNING = RequestStatus.RUNNING.value
_SUCCEEDED = RequestStatus.SUCCEEDED.value

_HELD = (
    f"SELECT request_id, lease_token FROM {jobs.name} "
    "WHERE request_id IN ({ids}) AND state = ? AND lease_expires_at > ?"
)
_SEQS = f"SELECT id, last_seq, attempts FROM {requests.name} WHERE id IN ({{ids}})"
_GONE = f"DELETE FROM {jobs.name} WHERE request_id = ?"
_ENDED = (
    f"UPDATE {requests.name} SET status = ?, result = ?, error = NULL, finished_at = ?, "
    "updated_at = ?, last_seq = ? WHERE id = ?"
)
_MOVED = f"UPDATE {requests.name} SET updated_at = ?, last_seq = ? WHERE id = ?"
_STORED = (
    f"INSERT INTO {events.name} (request_id, seq, kind, attempt, data, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)


class LiteWriter:
    """Group writes on the SQLite database at ``path``, each in one call to a thread that
    holds its own connection (opened on first use, with the store's pragmas)."""

    def __init__(self, path: str, busy_timeout: float) -> None:
        self._path = path
        self._busy_timeout = busy_timeout
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="inferd-sqlite-writer")
        self._conn: sqlite3.Connection | None = None

    async def write(self, writes: Sequence[JobWrite], now: int) -> list[list[Event] | None]:
        """:meth:`inferd.jobs.sql.SqlStore.write` at ``now`` (µs); the caller holds the
        process's write lock. StoreUnavailable when the database cannot be written."""
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(self._thread, self._write, writes, now)
        except sqlite3.OperationalError as exc:  # locked past the busy timeout, disk, ...
            raise StoreUnavailable(
                "the request store is unavailable; try again later", retry_after=1
            ) from exc

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._thread, self._close)
        self._thread.shutdown(wait=True)

    # --- on the writer's thread ----------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self._path, timeout=self._busy_timeout, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._conn = conn
        return self._conn

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _write(self, writes: Sequence[JobWrite], now: int) -> list[list[Event] | None]:
        conn = self._connection()
        tokens = {w.lease.request_id: w.lease.token for w in writes}
        marks = ", ".join("?" * len(tokens))
        conn.execute("BEGIN IMMEDIATE")
        try:
            found = conn.execute(_HELD.format(ids=marks), (*tokens, _RUNNING, now)).fetchall()
            held = {rid for rid, token in found if tokens[rid] == token}
            if not held:
                conn.execute("COMMIT")
                return [None] * len(writes)
            marks = ", ".join("?" * len(held))
            seqs = {
                rid: (seq, attempt)
                for rid, seq, attempt in conn.execute(_SEQS.format(ids=marks), tuple(held))
            }
            sent_at = iso(now)
            created_at = to_datetime(now)
            out: list[list[Event] | None] = []
            stored: list[tuple[Any, ...]] = []
            ended: list[tuple[Any, ...]] = []
            moved: list[tuple[Any, ...]] = []
            for w in writes:
                rid = w.lease.request_id
                if rid not in held:
                    out.append(None)
                    continue
                seq, attempt = seqs[rid]
                new: list[Event] = []
                for data in w.responses:
                    seq += 1
                    new.append(
                        _event(
                            rid,
                            seq,
                            attempt,
                            EventKind.RESPONSE,
                            {"sent_at": sent_at} | data,
                            created_at,
                        )
                    )
                if w.done:
                    seq += 1
                    done = {"status": _SUCCEEDED, "result": w.result}
                    new.append(_event(rid, seq, attempt, EventKind.DONE, done, created_at))
                    ended.append((_SUCCEEDED, json.dumps(w.result), now, now, seq, rid))
                elif new:
                    moved.append((now, seq, rid))
                stored.extend(
                    (rid, e.seq, e.kind.value, attempt, json.dumps(e.data), now) for e in new
                )
                out.append(new)
            if ended:
                conn.executemany(_GONE, [(row[-1],) for row in ended])
                conn.executemany(_ENDED, ended)
            if moved:
                conn.executemany(_MOVED, moved)
            if stored:
                conn.executemany(_STORED, stored)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return out


def _event(
    request_id: str, seq: int, attempt: int, kind: EventKind, data: dict[str, Any], at: Any
) -> Event:
    return Event(
        request_id=request_id, seq=seq, kind=kind, data=data, attempt=attempt, created_at=at
    )
