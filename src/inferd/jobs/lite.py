"""The hot transactions on SQLite (a group of submits, a claim, a group write), each as one
hand-off to a thread.

aiosqlite runs each call on a SQLite connection in a thread of its own, and SQLAlchemy makes
several calls per statement (open a cursor, execute, fetch, close): the group write of
:meth:`inferd.jobs.sql.SqlStore.write` (BEGIN IMMEDIATE, lock check, seqs, updates, inserts,
COMMIT) crossed between the event loop and that thread some twenty times, a claim or a group
of submits as many. Each crossing
waits for a turn of the event loop, which in the embedded default is also serving HTTP: at
300 submits/s a streamed chunk's transaction took 20-30 ms, against ~4 ms for the same
write on PostgreSQL. The statements themselves take microseconds.

:class:`LiteWriter` runs each of these transactions in one call on a thread that owns a
connection of its own: the same statements in plain SQL, one hand-off there and one back. A
claim also says whether some running job's lease has expired; the caller then reaps (a
transaction of the general path, rare) and claims again, as on PostgreSQL
(:mod:`inferd.jobs.pg`). A group of submits that would pass a queue bound stores nothing and
says so: the caller stores its requests one at a time, each getting its own answer.
The thread takes its calls in order, a streamed chunk's write before any other call
waiting (a follower waits for it), then a group of submits (each client waits for its
answer), then the rest; and it starts the next as soon as one ends: a call does not
wait for the event loop to have taken the previous one's answer. (Each held an asyncio lock
until then; at 1,000 submits/s in the embedded default that lock was held ~70 % of the
time, for ~1 ms of SQLite work per call, and a chunk or a submit waited for it up to 12 ms
at p99.) A write of the store's general path (SQLAlchemy's connection: cancels, the
maintenance, rare paths) holds the thread idle between two calls while it runs
(:meth:`LiteWriter.exclusive`), so neither connection waits for the other in SQLite's busy
handler; other processes' writers are waited for in SQLite's busy timeout, as with
aiosqlite. The writer's connection does no checkpoints: a thread of their own does
(:meth:`LiteWriter._checkpoint_soon`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import sqlite3
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NamedTuple, TypeVar

import orjson

from inferd.db.schema import charges, events, jobs, requests
from inferd.errors import StoreUnavailable
from inferd.jobs.rows import Started, iso, json_text, to_datetime
from inferd.jobs.types import Event, EventKind, JobWrite, RequestStatus
from inferd.logs import get_logger

__all__ = ["CHECKPOINT_SECONDS", "SLOW_CLAIM_US", "Claimed", "LiteWriter"]

T = TypeVar("T")
_US = 1_000_000
SLOW_CLAIM_US = 20_000
"""A claim slower than this (µs) restarts its leases when it ends, on both databases."""
_QUEUED = RequestStatus.QUEUED.value
_RUNNING = RequestStatus.RUNNING.value
_SUCCEEDED = RequestStatus.SUCCEEDED.value
CHECKPOINT_SECONDS = 0.25  # the least time between two checkpoints of the WAL

log = get_logger("inferd.jobs")

_HELD = (
    f"SELECT request_id, lease_token FROM {jobs.name} "
    "WHERE request_id IN ({ids}) AND state = ? AND lease_expires_at > ?"
)
_EXTEND = (
    f"UPDATE {jobs.name} SET lease_expires_at = ? "
    "WHERE request_id = ? AND state = ? AND lease_token = ? AND lease_expires_at > ?"
)
_CANCELLING = f"SELECT cancel_requested FROM {requests.name} WHERE id = ?"
_SEQS = f"SELECT id, last_seq, attempts FROM {requests.name} WHERE id IN ({{ids}})"
_GONE = f"DELETE FROM {jobs.name} WHERE request_id = ?"
_ENDED = (
    f"UPDATE {requests.name} SET status = ?, result = ?, error = NULL, finished_at = ?, "
    "updated_at = ?, last_seq = ? WHERE id = ?"
)
_MOVED = f"UPDATE {requests.name} SET updated_at = ?, last_seq = ? WHERE id = ?"
_OVERDUE = f"SELECT EXISTS (SELECT 1 FROM {jobs.name} WHERE state = ? AND lease_expires_at <= ?)"
_TAKE = (
    f"UPDATE {jobs.name} SET state = ?, lease_token = ?, lease_expires_at = ?, worker_id = ? "
    f"WHERE request_id IN (SELECT request_id FROM {jobs.name} "
    "WHERE state = ? AND run_at <= ? AND (expires_at IS NULL OR expires_at > ?){models} "
    "ORDER BY run_at, request_id LIMIT ?) RETURNING request_id"
)
_START = (
    f"UPDATE {requests.name} SET status = ?, attempts = attempts + 1, "
    "started_at = coalesce(started_at, ?), updated_at = ?, last_seq = last_seq + 1 "
    "WHERE id IN ({ids}) "
    "RETURNING id, last_seq, attempts, model, input, parameters, trace_context, "
    f"EXISTS (SELECT 1 FROM {charges.name} AS c WHERE c.request_id = {requests.name}.id)"
)
_RELEASE_LATE = f"UPDATE {jobs.name} SET lease_expires_at = ? WHERE request_id IN ({{ids}})"
_QUEUED_OF_MODEL = (
    f"SELECT count(*) FROM (SELECT 1 FROM {jobs.name} WHERE model = ? AND state = ? LIMIT ?)"
)
_QUEUED_OF_KEY = (
    f"SELECT count(*) FROM (SELECT 1 FROM {jobs.name} WHERE key_id = ? AND state = ? LIMIT ?)"
)
_NEW_REQUEST = (
    f"INSERT INTO {requests.name} (id, user_id, model, version, input, parameters, body_hash, "
    "idempotency_key, status, attempts, max_attempts, result, error, cancel_requested, "
    "last_seq, created_at, updated_at, started_at, finished_at, trace_context, expires_at, "
    "dedup_hash, dedup_of) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, NULL, ?, 0, ?, NULL, NULL, 0, 1, ?, ?, NULL, NULL, ?, ?, "
    "NULL, NULL)"
)
_NEW_JOB = (
    f"INSERT INTO {jobs.name} (request_id, model, state, run_at, expires_at, key_id) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)
_NEW_CHARGE = (
    f"INSERT INTO {charges.name} (request_id, key_id, user_id, day, reserved) "
    "VALUES (?, ?, ?, ?, ?)"
)
_STORED = (
    f"INSERT INTO {events.name} (request_id, seq, kind, attempt, data, created_at) "
    "VALUES (?, ?, ?, ?, ?, ?)"
)


class Claimed(NamedTuple):
    """What one claim did: the requests it started (rows with ``id``, ``last_seq``,
    ``attempts``, ``model``, ``input``, ``parameters``, ``trace_context``, ``charged``, by id),
    their lease expiry (µs), and whether some running job's lease had expired."""

    rows: list[Any]
    expires: int
    overdue: bool


# The writer thread's priorities: a streamed chunk's write (a follower waits for it), then a
# group of submits (each client waits for its 202), then the rest (claims, completions, ...).
_CHUNK, _SUBMIT, _OTHER = range(3)
_PRIORITIES = 3


class _Call(NamedTuple):
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop


def _succeed(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():  # (its caller was cancelled meanwhile)
        future.set_result(result)


def _fail(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)


class LiteWriter:
    """Group writes on the SQLite database at ``path``, each in one call to a thread that
    holds its own connection (opened on first use, with the store's pragmas)."""

    def __init__(self, path: str, busy_timeout: float) -> None:
        self._path = path
        self._busy_timeout = busy_timeout
        self._conn: sqlite3.Connection | None = None
        # The writer's thread takes its calls from a queue per priority, the first first.
        self._queues: tuple[collections.deque[_Call], ...] = tuple(
            collections.deque() for _ in range(_PRIORITIES)
        )
        self._ready = threading.Condition(threading.Lock())
        self._thread: threading.Thread | None = None
        self._closed = False
        # Checkpoints (the WAL copied back into the database) on a thread of their own; see
        # _checkpoint_soon.
        self._checkpointer = ThreadPoolExecutor(1, thread_name_prefix="inferd-sqlite-checkpoint")
        self._checkpoint_conn: sqlite3.Connection | None = None
        self._checkpointed = 0.0  # time.monotonic() of the last one asked for
        self._checkpointing = False

    async def write(
        self, writes: Sequence[JobWrite], clock: Callable[[], float], *, urgent: bool = False
    ) -> list[list[Event] | None]:
        """:meth:`inferd.jobs.sql.SqlStore.write`, judged at ``clock()`` read on the thread;
        ``urgent``: before every other call waiting (a streamed chunk, which a follower
        waits for). StoreUnavailable when the database cannot be written."""
        return await self._call(self._write, writes, clock, priority=_CHUNK if urgent else _OTHER)

    async def claim(
        self,
        *,
        worker_id: str,
        token: str,
        lease_seconds: float,
        limit: int,
        models: Sequence[str] | None,
        clock: Callable[[], float],
    ) -> Claimed:
        """Take up to ``limit`` of the oldest due jobs (of ``models`` if given) with a lease
        of ``token``. The time is read on the
        thread once the database's write lock is held, and again at the end: a slow claim's
        leases count from its end (see :meth:`inferd.jobs.sql.SqlStore.claim_many`)."""
        return await self._call(self._claim, worker_id, token, lease_seconds, limit, models, clock)

    async def create(
        self,
        rows: Sequence[dict[str, Any]],
        charged: Sequence[dict[str, Any]],
        *,
        key_ids: Sequence[str | None],
        model_bounds: Sequence[tuple[str, int, int]],
        key_bounds: Sequence[tuple[str, int, int]],
        now: int,
    ) -> bool:
        """Store new requests as :func:`inferd.jobs.pg.create` does, at ``now`` (µs). True if
        stored, False (nothing stored) if a bound is reached."""
        return await self._call(
            self._create, rows, charged, key_ids, model_bounds, key_bounds, now, priority=_SUBMIT
        )

    async def heartbeat(
        self, request_id: str, token: str, lease_seconds: float, clock: Callable[[], float]
    ) -> bool | None:
        """Extend a valid lease by ``lease_seconds`` from ``clock()`` read on the thread: None
        if the lease is no longer valid, else whether the request goes on (False: a cancel
        was asked for); as :meth:`inferd.jobs.sql.SqlStore.heartbeat`."""
        return await self._call(self._heartbeat, request_id, token, lease_seconds, clock)

    @contextlib.asynccontextmanager
    async def exclusive(self) -> AsyncIterator[None]:
        """Hold the writer's thread idle, between two of its transactions, while the body runs:
        for a write of the process through another connection (the store's general path),
        which would otherwise wait in SQLite's busy handler for this one's lock."""
        loop = asyncio.get_running_loop()
        holding: asyncio.Future[None] = loop.create_future()
        resume = threading.Event()

        def hold() -> None:
            loop.call_soon_threadsafe(_succeed, holding, None)
            resume.wait()

        try:
            self._submit(hold, ())
            await holding
            yield
        finally:
            resume.set()  # (before it ran, if cancelled meanwhile: it then returns at once)

    def _submit(
        self, fn: Callable[..., T], args: tuple[Any, ...], priority: int = _OTHER
    ) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._ready:
            if self._closed:
                raise StoreUnavailable("the request store is closed", retry_after=1)
            self._queues[priority].append(_Call(fn, args, future, loop))
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._serve, name="inferd-sqlite-writer", daemon=True
                )
                self._thread.start()
            self._ready.notify()
        return future

    async def _call(self, fn: Callable[..., T], *args: Any, priority: int = _OTHER) -> T:
        future = self._submit(fn, args, priority)
        try:
            return await future
        except sqlite3.OperationalError as exc:  # locked past the busy timeout, disk, ...
            raise StoreUnavailable(
                "the request store is unavailable; try again later", retry_after=1
            ) from exc

    async def close(self) -> None:
        """Run the calls already asked for, then close the connections and end the threads
        (a second close does nothing)."""
        if self._closed:
            return
        if self._thread is not None:
            await self._call(self._close)
        with self._ready:
            self._closed = True
            self._ready.notify()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._checkpointer, self._close_checkpoints)
        self._checkpointer.shutdown(wait=True)

    # --- on the writer's thread ----------------------------------------------------------------

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            conn = sqlite3.connect(self._path, timeout=self._busy_timeout, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            conn.execute("PRAGMA wal_autocheckpoint=0")  # the checkpointer's thread does them
            self._conn = conn
        return self._conn

    def _serve(self) -> None:
        """The writer's thread: each call in turn by priority, each answered on its
        event loop as it ends; the next starts at once, without waiting for that loop."""
        ready, queues = self._ready, self._queues
        while True:
            with ready:
                while not any(queues):
                    if self._closed:
                        return
                    ready.wait()
                call = next(queue for queue in queues if queue).popleft()
            try:
                result = call.fn(*call.args)
            except BaseException as exc:  # handed to the caller, whatever it is
                call.loop.call_soon_threadsafe(_fail, call.future, exc)
            else:
                call.loop.call_soon_threadsafe(_succeed, call.future, result)
            finally:
                self._checkpoint_soon()
            del call  # (holds the result until the next call otherwise)

    def _checkpoint_soon(self) -> None:
        """Ask the checkpointer's thread for a checkpoint, at most every CHECKPOINT_SECONDS.

        SQLite checkpoints by default in the transaction whose commit takes the WAL past 1,000
        pages: at 1,000 submits/s that was every second or so, and that transaction (a group of
        submits, a claim or a streamed chunk, with the write lock held) took 10-15 ms instead
        of ~1. A passive checkpoint from another connection copies what it can without
        waiting for or stopping the writer, so the writer's connection does none."""
        now = time.monotonic()
        if self._checkpointing or now - self._checkpointed < CHECKPOINT_SECONDS:
            return
        self._checkpointing = True
        self._checkpointed = now
        try:
            self._checkpointer.submit(self._checkpoint)
        except RuntimeError:  # shut down: closing
            self._checkpointing = False

    # --- on the checkpointer's thread ----------------------------------------------------------

    def _checkpoint(self) -> None:
        try:
            if self._checkpoint_conn is None:
                self._checkpoint_conn = sqlite3.connect(
                    self._path, timeout=self._busy_timeout, isolation_level=None
                )
            self._checkpoint_conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:  # the next one tries again; SQLite's own do no better
            log.debug("sqlite checkpoint failed", detail=repr(exc))
        finally:
            self._checkpointing = False

    def _close_checkpoints(self) -> None:
        if self._checkpoint_conn is not None:
            self._checkpoint_conn.close()
            self._checkpoint_conn = None

    # --- on the writer's thread ----------------------------------------------------------------

    def _close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _heartbeat(
        self, request_id: str, token: str, lease_seconds: float, clock: Callable[[], float]
    ) -> bool | None:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            now = round(clock() * _US)  # once the database's write lock is held
            expires = now + round(lease_seconds * _US)
            extended = conn.execute(_EXTEND, (expires, request_id, _RUNNING, token, now))
            if extended.rowcount != 1:
                conn.execute("COMMIT")
                return None
            (cancel,) = conn.execute(_CANCELLING, (request_id,)).fetchone()
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return not cancel

    def _claim(
        self,
        worker_id: str,
        token: str,
        lease_seconds: float,
        limit: int,
        models: Sequence[str] | None,
        clock: Callable[[], float],
    ) -> Claimed:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            now = round(clock() * _US)
            expires = now + round(lease_seconds * _US)
            overdue = bool(conn.execute(_OVERDUE, (_RUNNING, now)).fetchone()[0])
            only = "" if models is None else f" AND model IN ({', '.join('?' * len(models))})"
            taken = [
                rid
                for (rid,) in conn.execute(
                    _TAKE.format(models=only),
                    (
                        _RUNNING,
                        token,
                        expires,
                        worker_id,
                        _QUEUED,
                        now,
                        now,
                        *(models or ()),
                        limit,
                    ),
                )
            ]
            if not taken:
                conn.execute("COMMIT")
                return Claimed([], expires, overdue)
            ids = ", ".join("?" * len(taken))
            started = sorted(
                (
                    Started(
                        rid,
                        seq,
                        attempts,
                        model,
                        _json(input),
                        _json(parameters),
                        _json(trace),
                        bool(charged),
                    )
                    for rid, seq, attempts, model, input, parameters, trace, charged in (
                        conn.execute(_START.format(ids=ids), (_RUNNING, now, now, *taken))
                    )
                ),
                key=lambda row: row.id,
            )
            conn.executemany(
                _STORED,
                [
                    (
                        row.id,
                        row.last_seq,
                        EventKind.STATUS.value,
                        row.attempts,
                        json_text({"status": _RUNNING, "attempt": row.attempts}),
                        now,
                    )
                    for row in started
                ],
            )
            late = round(clock() * _US)
            if late - now > SLOW_CLAIM_US:
                expires = late + round(lease_seconds * _US)
                conn.execute(_RELEASE_LATE.format(ids=ids), (expires, *taken))
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return Claimed(list(started), expires, overdue)

    def _create(
        self,
        rows: Sequence[dict[str, Any]],
        charged: Sequence[dict[str, Any]],
        key_ids: Sequence[str | None],
        model_bounds: Sequence[tuple[str, int, int]],
        key_bounds: Sequence[tuple[str, int, int]],
        now: int,
    ) -> bool:
        conn = self._connection()
        conn.execute("BEGIN IMMEDIATE")
        try:
            for count, bounds in ((_QUEUED_OF_MODEL, model_bounds), (_QUEUED_OF_KEY, key_bounds)):
                for what, bound, adding in bounds:
                    queued = conn.execute(count, (what, _QUEUED, bound)).fetchone()[0]
                    if queued + adding > bound:
                        conn.execute("ROLLBACK")
                        return False
            conn.executemany(
                _NEW_REQUEST,
                [
                    (
                        row["id"],
                        row["user_id"],
                        row["model"],
                        row["version"],
                        json_text(row["input"]),
                        json_text(row["parameters"]),
                        row["body_hash"],
                        _QUEUED,
                        row["max_attempts"],
                        now,
                        now,
                        json_text(row["trace_context"]),
                        row["expires_at"],
                    )
                    for row in rows
                ],
            )
            conn.executemany(
                _NEW_JOB,
                [
                    (row["id"], row["model"], _QUEUED, now, row["expires_at"], key_id)
                    for row, key_id in zip(rows, key_ids, strict=True)
                ],
            )
            first = json_text({"status": _QUEUED, "attempt": 0})
            conn.executemany(
                _STORED,
                [(row["id"], 1, EventKind.STATUS.value, 0, first, now) for row in rows],
            )
            if charged:
                conn.executemany(
                    _NEW_CHARGE,
                    [
                        (c["request_id"], c["key_id"], c["user_id"], c["day"], c["reserved"])
                        for c in charged
                    ],
                )
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
        return True

    def _write(
        self, writes: Sequence[JobWrite], clock: Callable[[], float]
    ) -> list[list[Event] | None]:
        conn = self._connection()
        tokens = {w.lease.request_id: w.lease.token for w in writes}
        marks = ", ".join("?" * len(tokens))
        conn.execute("BEGIN IMMEDIATE")
        try:
            now = round(clock() * _US)  # once the database's write lock is held
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
                    ended.append((_SUCCEEDED, json_text(w.result), now, now, seq, rid))
                elif new:
                    moved.append((now, seq, rid))
                stored.extend(
                    (rid, e.seq, e.kind.value, attempt, json_text(e.data), now) for e in new
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


def _json(stored: Any) -> Any:
    """A stored JSON column's value: SQL NULL as None, and a number as itself (a column of
    SQLite's type JSON has numeric affinity: the text of a JSON number is stored as one)."""
    if not isinstance(stored, str):
        return stored
    try:
        return orjson.loads(stored)
    except orjson.JSONDecodeError:  # a NaN or an infinity, as an older version wrote them
        return json.loads(stored)
