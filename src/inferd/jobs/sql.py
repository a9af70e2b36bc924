"""The SQL backend of long-running requests: one store for the API and the workers.

:class:`SqlStore` implements both :class:`~inferd.jobs.types.RequestStore` and
:class:`~inferd.jobs.types.JobQueue` on SQLAlchemy Core (async), with two databases:

* SQLite through aiosqlite, the embedded default (``sqlite+aiosqlite:///path/inferd.db``). WAL
  mode lets readers run beside the one writer. Every write transaction starts with
  ``BEGIN IMMEDIATE``, so it takes the write lock before reading what it will change: a
  deferred transaction that reads and then writes can fail at once with "database is
  locked" (the busy timeout does not apply to a lock upgrade). Writers of one process also
  queue on an asyncio lock, which is fairer and cheaper than SQLite's busy-wait polling;
  writers of other processes wait in the busy timeout.
* PostgreSQL through asyncpg. Claims use ``SELECT ... FOR UPDATE SKIP LOCKED`` so workers
  never wait on each other. Every transaction that changes a request first locks its job
  row, then its request row: one lock order, so concurrent changes cannot deadlock. The
  statements run most often (the API's group commit of new requests, a worker's claim and
  its group write of chunks and completions) are one statement each, one round trip, in
  :mod:`inferd.jobs.pg`; on SQLite they are one call each to a writer thread
  (:mod:`inferd.jobs.lite`). Everything else is written here, for both databases.

Fencing: each worker-side write first locks the job row *if* it is still running with the
lease's token and an unexpired lease; if not, nothing is written. On PostgreSQL the
condition is re-checked on the newest row version once the lock is granted, so a write
racing a reaper or a new claim cannot slip through.

A request whose cancel was asked for is never requeued: where a retry, a reaped lease or a
release would put it back in the queue, it becomes ``cancelled`` instead.

Queue controls (the bounded queue, expiry, deduplication, dead letters, retention) are their
own statements, below the workers' side: a claim only skips jobs past their ``expires_at``
(in its statement, :mod:`inferd.jobs.pg` and :mod:`inferd.jobs.lite`), and a sweep
(:meth:`SqlStore.expire_due`) ends them.

The schema is created by the migrations (:func:`inferd.db.migrate.migrate`), not here.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import asyncpg
from sqlalchemy import (
    URL,
    Row,
    delete,
    func,
    literal,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from inferd.db import hot
from inferd.db.engine import UNAVAILABLE_ERRORS, create_engine
from inferd.db.hot import HotConnections
from inferd.db.schema import charges, events, jobs, requests
from inferd.errors import (
    BadRequest,
    ConfigError,
    IdempotencyConflict,
    InvalidState,
    QueueFull,
    StoreUnavailable,
    TooManyQueued,
)
from inferd.jobs import pg
from inferd.jobs.ids import decode_cursor, encode_cursor, new_request_id
from inferd.jobs.lite import SLOW_CLAIM_US, LiteWriter
from inferd.jobs.rows import body_hash, iso, to_datetime, to_event, to_record
from inferd.jobs.types import (
    TERMINAL,
    Event,
    EventKind,
    JobWrite,
    Lease,
    Page,
    QueueLimits,
    RequestRecord,
    RequestStatus,
)

__all__ = ["CANCELLED_BY_USER", "HOT_SETTINGS", "REQUEUEABLE", "SqlStore"]

CANCELLED_BY_USER = "cancelled by the user"
"""The error of a request cancelled by its user."""

_US = 1_000_000
_MAX_PAGE = 100
_HOT_POOL = 3  # PostgreSQL: pooled connections of the hot statements (a claim, two writes)
_UNAVAILABLE = UNAVAILABLE_ERRORS + hot.UNAVAILABLE  # the engine's and asyncpg's own
_REAP_BATCH = 100  # expired leases taken back per claim; the rest wait for the next one
_CREATE_BATCH = 500  # creates stored in one transaction at most

HOT_SETTINGS = {
    "application_name": "inferd",
    # Generic plans: planned per execution, as the other statements are, each of the hot
    # statements cost 0.2-0.3 ms of the server's CPU (EXPLAIN ANALYZE) at a thousand
    # executions a second. Measured: after a drain of 3,000 jobs, a flow of 1,000 jobs/s
    # kept up for 60 s, with chunk p99 12 ms instead of 21-23 (bench/README.md).
    "plan_cache_mode": "force_generic_plan",
    # A generic plan is made at a statement's first run on a connection and kept until
    # ANALYZE changes the tables' statistics. Made while the tables were empty (a new
    # database, a worker started before the first requests), it scanned the whole of
    # inferd_requests (which keeps every request) to update a claim's or a write's few
    # rows: 30 ms per claim at 20,000 requests, and more with every request, until
    # autovacuum's first ANALYZE of the table, a minute or more later. At 1,000 submits/s
    # the worker fell behind within seconds and the queue never drained (bench/README.md).
    # None of these statements reads more than the rows it names through an index: a
    # scan of a whole table is never their plan, whatever the statistics say.
    "enable_seqscan": "off",
}
"""Server settings of the connections that run the hot statements (:mod:`inferd.jobs.pg`)."""

_QUEUED = RequestStatus.QUEUED.value
_RUNNING = RequestStatus.RUNNING.value
_SUCCEEDED = RequestStatus.SUCCEEDED.value
_TERMINAL = sorted(status.value for status in TERMINAL)
_DEDUP_FIELDS = (  # what a deduplicated request keeps of its own submit
    "user_id",
    "model",
    "version",
    "input",
    "parameters",
    "body_hash",
    "idempotency_key",
    "max_attempts",
    "dedup_hash",
)
REQUEUEABLE = frozenset({RequestStatus.DEAD, RequestStatus.FAILED, RequestStatus.EXPIRED})
"""The statuses an admin may put back in the queue (``POST /v1/admin/requests/{id}/requeue``)."""

_Fields: TypeAlias = dict[str, Any]


@dataclass(slots=True)
class _Create:
    """One request to store: its row (without id, times and expiry until its transaction),
    its budget charge, its deadline as asked, and the queue bounds it must fit in."""

    row: _Fields
    charge: _Fields | None = None
    expires_at: float | None = None
    ttl_seconds: float | None = None
    limits: QueueLimits | None = None


class _Refused(Exception):
    """A batch of creates would exceed a queue bound: stored one at a time instead."""


_Row: TypeAlias = "Row[*tuple[Any, ...]]"  # any row (a string: Row is variadic on 2.1 only)


class SqlStore:
    """Requests, their events and their jobs in one SQL database (SQLite or PostgreSQL).

    ``clock`` returns epoch seconds; tests inject one to move time instead of sleeping.
    ``backoff_base`` and ``backoff_max`` (seconds) shape the retry delay of a failed attempt:
    ``min(max, base * 2**(attempt-1))`` times a random factor in [0.5, 1], so that jobs
    failing together do not retry together. The other options go to
    :func:`inferd.db.engine.create_engine`. Constructing a store does no I/O (beyond
    creating the folder of a SQLite file); :meth:`connect` also checks that it answers.
    """

    def __init__(
        self,
        url: str | URL,
        *,
        clock: Callable[[], float] = time.time,
        backoff_base: float = 1.0,
        backoff_max: float = 60.0,
        pool_size: int = 5,
        busy_timeout: float = 5.0,
        connect_timeout: float = 10.0,
        echo: bool = False,
        create_interval: float = 0.0,
    ) -> None:
        if backoff_base < 0 or backoff_max < 0:
            raise ConfigError("backoff_base and backoff_max must not be negative")
        if create_interval < 0:
            raise ConfigError("create_interval must not be negative")
        self._engine = create_engine(
            url,
            pool_size=pool_size,
            busy_timeout=busy_timeout,
            connect_timeout=connect_timeout,
            echo=echo,
        )
        # PostgreSQL: the hot statements (inferd.jobs.pg) on asyncpg connections of their
        # own (inferd.db.hot: through the engine each one cost ~0.3-0.4 ms more of the
        # client's CPU), with the settings of HOT_SETTINGS.
        self._hot: HotConnections | None = None
        if self._engine.dialect.name == "postgresql":
            self._hot = HotConnections(
                self._engine.url,
                min(pool_size, _HOT_POOL),
                connect_timeout=connect_timeout,
                server_settings=HOT_SETTINGS,
            )
        self._clock = clock
        self._pool_size = pool_size
        self._creates: list[tuple[_Create, asyncio.Future[None]]]
        self._creates = []
        self._creating: asyncio.Task[None] | None = None
        # The least time between two group commits of submits that follow each other (see
        # _flush_creates), and the loop's time when the last one started.
        self._create_interval = create_interval
        self._created_at = float("-inf")
        self._creates_crowded = False
        self._backoff_base = backoff_base
        self._backoff_max = backoff_max
        self._postgres = self._engine.dialect.name == "postgresql"
        # On SQLite, the writes of the general path take turns, and hold the hot path's
        # writer thread (inferd.jobs.lite) idle while they run.
        self._write_lock: contextlib.AbstractAsyncContextManager[Any] = (
            contextlib.nullcontext() if self._postgres else asyncio.Lock()
        )
        # Write transactions a worker may run at once: on PostgreSQL side by side (row
        # locks); on SQLite the second lane is for streamed chunks, which the writer thread
        # takes before anything else waiting, not after the completions in the first lane.
        self.write_lanes = 2
        # SQLite: a worker's group write in one hand-off to a thread (see inferd.jobs.lite).
        self._lite: LiteWriter | None = None
        if not self._postgres:
            database = self._engine.url.database
            assert database is not None  # create_engine refuses the in-memory forms
            self._lite = LiteWriter(database, busy_timeout)

    @classmethod
    async def connect(cls, url: str | URL, **options: Any) -> SqlStore:
        """A store on ``url`` whose database has answered; StoreUnavailable if it does not."""
        store = cls(url, **options)
        try:
            await store.ping()
        except BaseException:
            await store.close()
            raise
        return store

    @property
    def engine(self) -> AsyncEngine:
        """The underlying engine (for health checks and tests)."""
        return self._engine

    @property
    def hot(self) -> HotConnections | None:
        """On PostgreSQL, the connections of the statements of :mod:`inferd.jobs.pg` (a pool
        of their own, with generic plans); None on SQLite."""
        return self._hot

    async def ping(self) -> None:
        """Run a trivial query; raises StoreUnavailable when the database does not answer."""
        async with self._read() as tx:
            await tx.conn.execute(select(1))

    async def warm(self, connections: int = 2) -> None:
        """Open up to ``connections`` pooled connections now (at most the pool's size), so
        that the first writes that run side by side (a chunk and a heartbeat) do not each
        wait for a new connection: on a busy machine that wait can outlast a short lease."""
        async with self._available(), contextlib.AsyncExitStack() as stack:
            for _ in range(max(1, min(connections, self._pool_size))):
                await stack.enter_async_context(self._engine.connect())
            if self._hot is not None:  # the claims' and group writes' own
                await self._hot.warm(connections)

    async def close(self) -> None:
        """Close every pooled connection."""
        if self._lite is not None:
            await self._lite.close()
        if self._hot is not None:
            await self._hot.close()
        await self._engine.dispose()

    # --- transactions -------------------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def _available(self) -> AsyncIterator[None]:
        try:
            yield
        except _UNAVAILABLE as exc:
            raise StoreUnavailable(
                "the request store is unavailable; try again later", retry_after=1
            ) from exc

    @contextlib.asynccontextmanager
    async def _write(self) -> AsyncIterator[_Tx]:
        lite = self._lite.exclusive() if self._lite is not None else contextlib.nullcontext()
        async with self._available(), self._write_lock, lite, self._engine.begin() as conn:
            # The time is read once the write lock is held: leases are judged at that instant.
            yield _Tx(conn, round(self._clock() * _US), self._postgres)

    @contextlib.asynccontextmanager
    async def _one_statement(self) -> AsyncIterator[asyncpg.Connection]:
        """A connection outside any transaction, for a statement atomic by itself (the
        statements of :mod:`inferd.jobs.pg`): no BEGIN and no COMMIT round trip."""
        assert self._hot is not None  # PostgreSQL's pool of autocommit connections
        async with self._available(), self._hot.connection() as conn:
            yield conn

    @contextlib.asynccontextmanager
    async def _read(self) -> AsyncIterator[_Tx]:
        async with self._available(), self._engine.connect() as conn:
            if self._postgres:
                # One snapshot for the several statements that build a record.
                await conn.execution_options(isolation_level="REPEATABLE READ")
            else:
                await conn.execution_options(inferd_read_only=True)  # a deferred BEGIN
            async with conn.begin():
                yield _Tx(conn, round(self._clock() * _US), self._postgres)

    # --- the API's side -----------------------------------------------------------------------

    async def create(
        self,
        *,
        user: str,
        model: str,
        input: Any,
        parameters: dict[str, Any],
        idempotency_key: str | None = None,
        max_attempts: int = 3,
        version: str | None = None,
        charge: dict[str, Any] | None = None,
        trace_context: dict[str, str] | None = None,
        expires_at: float | None = None,
        ttl_seconds: float | None = None,
        limits: QueueLimits | None = None,
        dedup_seconds: float | None = None,
    ) -> tuple[RequestRecord, bool]:
        """Store the request, its job and its first event in one transaction.

        ``charge`` (``key_id``, ``user_id``, ``day``, ``reserved``) is the budget the request
        reserved; it is stored in the same transaction, so a worker that finishes the request
        at once always finds it to settle.

        Returns (record, created). An ``idempotency_key`` already used by ``user`` returns
        the existing record (created False) when the body is the same, and raises
        IdempotencyConflict when it is not. Concurrent creates with one key are settled by
        the unique (user, key) constraint: the losers read the winner's record.

        ``version`` (beyond the protocol) records a pinned model version; it is part of the
        body that an idempotent retry must repeat.

        ``expires_at``/``ttl_seconds``, ``limits`` and ``dedup_seconds``: see
        :meth:`inferd.jobs.types.RequestStore.create`. A deduplicated request stores no job
        and no ``charge``; its record says ``deduplicated_from``.
        """
        if max_attempts < 1:
            raise BadRequest("max_attempts must be at least 1")
        dedup_hash = None
        if dedup_seconds is not None:
            dedup_hash = body_hash(model, version, input, parameters)
        # The version that will serve is not part of the body: a retry with the same key
        # after a model update is still the same request. The hash is read only to settle a
        # retry with the same Idempotency-Key: a request sent without one stores none (a
        # canonical JSON text and its sha256 were ~7 % of the API's CPU per submit).
        digest = body_hash(model, None, input, parameters) if idempotency_key is not None else ""
        if idempotency_key is not None:
            existing = await self._find_idempotent(user, idempotency_key, digest)
            if existing is not None:
                return existing, False
        row: dict[str, Any] = {
            "user_id": user,
            "model": model,
            "version": version,
            "input": input,
            "parameters": parameters,
            "body_hash": digest,
            "idempotency_key": idempotency_key,
            "status": _QUEUED,
            "attempts": 0,
            "max_attempts": max_attempts,
            "cancel_requested": False,
            "last_seq": 1,
            "trace_context": trace_context,
            "dedup_hash": dedup_hash,
        } | dict.fromkeys(("result", "error", "started_at", "finished_at", "dedup_of"))
        pending = _Create(row, charge, expires_at, ttl_seconds, limits)
        if idempotency_key is None and dedup_hash is None:
            # No key, no conflict to settle: stored with the creates of other requests.
            await self._create_together(pending)
            return to_record(row, []), True
        try:
            async with self._write() as tx:
                expires = _expiry(tx.now, expires_at, ttl_seconds)
                if dedup_hash is not None and dedup_seconds is not None:
                    found = await tx.duplicate(dedup_hash, tx.now - round(dedup_seconds * _US))
                    if found is not None:
                        fields = {key: row[key] for key in _DEDUP_FIELDS}
                        fields["expires_at"] = expires
                        return await tx.deduplicated(found, fields), True
                await tx.insert_created([pending])
        except sa_exc.IntegrityError:
            if idempotency_key is None:
                raise
            existing = await self._find_idempotent(user, idempotency_key, digest)
            if existing is None:
                raise
            return existing, False
        return to_record(row, []), True

    async def _create_together(self, pending: _Create) -> None:
        """Group commit of creates: the requests submitted while one transaction of creates
        runs are stored together in the next one (each row gets its id and times there)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._creates.append((pending, done))
        if self._creating is None or self._creating.done():
            self._creating = loop.create_task(self._flush_creates(), name="store-creates")
        await done

    async def _flush_creates(self) -> None:
        loop = asyncio.get_running_loop()
        while self._creates:
            # Submits that keep coming are stored at most every create_interval seconds, so
            # that each transaction holds several: at a thousand submits a second one each
            # ~1.5 ms held one or two requests, and every statement costs the API, the
            # server and their wake-ups more than its rows do. Only while they crowd (the
            # last transaction held several, or more came while it ran): a lone submit, or
            # one client's submits one after the other, are stored at once.
            if self._creates_crowded:
                wait = self._created_at + self._create_interval - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
            self._created_at = loop.time()
            batch = self._creates[:_CREATE_BATCH]
            del self._creates[:_CREATE_BATCH]
            try:
                if not await self._insert_created_at_once([pending for pending, _ in batch]):
                    raise _Refused
            except StoreUnavailable as exc:
                for *_, done in batch:
                    if not done.done():
                        done.set_exception(exc)
            except Exception:
                # Something in one of them (not the database): each on its own, so that one
                # bad request does not fail the others.
                # (A bound reached within the batch lands here too: one at a time, each
                # request is counted exactly.)
                for pending, done in batch:
                    try:
                        async with self._write() as tx:
                            await tx.insert_created([pending])
                    except Exception as exc:
                        if not done.done():
                            done.set_exception(exc)
                    else:
                        if not done.done():
                            done.set_result(None)
            except BaseException:
                for *_, done in batch:
                    done.cancel()
                raise
            else:
                for *_, done in batch:
                    if not done.done():
                        done.set_result(None)
            self._creates_crowded = len(batch) > 1 or bool(self._creates)

    async def _insert_created_at_once(self, items: Sequence[_Create]) -> bool:
        """:meth:`_Tx.insert_created` in one statement on PostgreSQL
        (:func:`inferd.jobs.pg.create`), in one hand-off to the writer thread on SQLite
        (:mod:`inferd.jobs.lite`); False, with nothing stored, if a queue bound would be
        exceeded."""
        adding: dict[tuple[str, str | None], tuple[QueueLimits, int]] = {}
        for item in items:
            if item.limits is not None:
                key = (item.row["model"], item.limits.key_id)
                limits, n = adding.get(key, (item.limits, 0))
                adding[key] = (limits, n + 1)
        model_bounds: dict[str, tuple[int, int]] = {}
        key_bounds: list[tuple[str, int, int]] = []
        for (model, key_id), (limits, n) in adding.items():
            if limits.max_queued is not None:
                bound, added = model_bounds.get(model, (limits.max_queued, 0))
                model_bounds[model] = (min(bound, limits.max_queued), added + n)
            if limits.max_queued_per_key is not None and key_id is not None:
                key_bounds.append((key_id, limits.max_queued_per_key, n))
        key_ids = [item.limits.key_id if item.limits else None for item in items]
        bounds = [(m, bound, n) for m, (bound, n) in model_bounds.items()]

        def stamp(now: int) -> list[dict[str, Any]]:
            for item in items:
                item.row.update(
                    id=new_request_id(now // 1000),
                    created_at=now,
                    updated_at=now,
                    expires_at=_expiry(now, item.expires_at, item.ttl_seconds),
                )
            return [{"request_id": item.row["id"], **item.charge} for item in items if item.charge]

        rows = [item.row for item in items]
        if self._lite is not None:
            async with self._available():
                now = round(self._clock() * _US)
                owed = stamp(now)
                return await self._lite.create(
                    rows,
                    owed,
                    key_ids=key_ids,
                    model_bounds=bounds,
                    key_bounds=key_bounds,
                    now=now,
                )
        async with self._one_statement() as conn:
            now = round(self._clock() * _US)
            owed = stamp(now)
            return await pg.create(
                conn,
                rows,
                owed,
                key_ids=key_ids,
                model_bounds=bounds,
                key_bounds=key_bounds,
                now=now,
            )

    async def _find_idempotent(self, user: str, key: str, digest: str) -> RequestRecord | None:
        query = select(requests).where(
            requests.c.user_id == user, requests.c.idempotency_key == key
        )
        async with self._read() as tx:
            row = (await tx.conn.execute(query)).first()
            if row is None:
                return None
            if row.body_hash != digest:
                raise IdempotencyConflict(
                    f"the Idempotency-Key {key!r} was already used with a different request "
                    "body (model, input or parameters); use a new key for a new request"
                )
            return await tx.record(row)

    async def replayed(
        self, user: str, key: str, model: str, input: Any, parameters: dict[str, Any]
    ) -> RequestRecord | None:
        """The request already stored under ``key`` for this body (a replay), or None;
        :class:`IdempotencyConflict` if the key was used with another body."""
        return await self._find_idempotent(user, key, body_hash(model, None, input, parameters))

    async def get(self, request_id: str, user: str | None = None) -> RequestRecord | None:
        """The record, or None if it does not exist (or belongs to another user)."""
        async with self._read() as tx:
            row = await tx.request_row(request_id, user)
            return None if row is None else await tx.record(row)

    async def page(self, user: str, cursor: str | None = None, limit: int = 20) -> Page:
        """The user's requests, newest first, keyset-paginated on (created_at, id)."""
        if not 1 <= limit <= _MAX_PAGE:
            raise BadRequest(f"limit must be between 1 and {_MAX_PAGE}, not {limit}")
        return await self._page_of(
            select(requests).where(requests.c.user_id == user), cursor, limit
        )

    async def events(self, request_id: str, after: int = 0, limit: int = 1000) -> list[Event]:
        """Stored events with ``seq > after``, in order, at most ``limit`` of them."""
        query = (
            select(events)
            .where(events.c.request_id == request_id, events.c.seq > after)
            .order_by(events.c.seq)
            .limit(max(1, limit))
        )
        async with self._read() as tx:
            return [to_event(row._mapping) for row in await tx.conn.execute(query)]

    async def cancel(self, request_id: str, user: str | None = None) -> RequestRecord | None:
        """Cancel: queued becomes cancelled at once, running gets ``cancel_requested``."""
        async with self._write() as tx:
            await tx.lock_job(request_id)
            row = await tx.request_row(request_id, user)
            if row is None:
                return None
            if row.status == _QUEUED:
                await tx.cancelled(request_id)
            elif row.status == _RUNNING and not row.cancel_requested:
                await tx.conn.execute(
                    update(requests)
                    .where(requests.c.id == request_id)
                    .values(cancel_requested=True, updated_at=tx.now)
                )
            else:
                return await tx.record(row)  # terminal, or asked for already
            changed = await tx.request_row(request_id)
            assert changed is not None  # locked and changed in this very transaction
            return await tx.record(changed)

    # --- the workers' side --------------------------------------------------------------------

    async def claim(
        self, worker_id: str, lease_seconds: float, models: list[str] | None = None
    ) -> Lease | None:
        """Take the oldest due job (of ``models`` if given) after reaping expired leases."""
        leases = await self.claim_many(worker_id, lease_seconds, 1, models)
        return leases[0] if leases else None

    async def claim_many(
        self, worker_id: str, lease_seconds: float, limit: int, models: list[str] | None = None
    ) -> list[Lease]:
        """Take up to ``limit`` of the oldest due jobs, and reap expired leases when there are
        any: one statement on PostgreSQL, one transaction on SQLite, however many jobs. The
        leases of one claim share a fresh token (the fence is the pair of request id and
        token)."""
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        if limit < 1 or (models is not None and not models):
            return []
        token = secrets.token_urlsafe(24)
        leases: list[Lease] = []
        for _ in range(2):  # a second time after reaping, for the slots left
            claim = self._claim_postgres if self._postgres else self._claim_lite
            rows, expires, overdue = await claim(
                worker_id, lease_seconds, limit - len(leases), models, token
            )
            leases.extend(_leases(rows, token, expires))
            if not overdue or len(leases) >= limit:
                break
            await self.reap_expired()
        return leases

    async def _claim_lite(
        self,
        worker_id: str,
        lease_seconds: float,
        limit: int,
        models: list[str] | None,
        token: str,
    ) -> tuple[list[Any], int, bool]:
        """One claim on SQLite, in one hand-off to the writer thread (:mod:`inferd.jobs.lite`):
        the rows of the requests it started, their lease expiry, whether a lease had expired."""
        assert self._lite is not None  # every SQLite store has one
        async with self._available():
            claimed = await self._lite.claim(
                worker_id=worker_id,
                token=token,
                lease_seconds=lease_seconds,
                limit=limit,
                models=models,
                clock=self._clock,
            )
        return claimed.rows, claimed.expires, claimed.overdue

    async def _claim_postgres(
        self,
        worker_id: str,
        lease_seconds: float,
        limit: int,
        models: list[str] | None,
        token: str,
    ) -> tuple[list[Any], int, bool]:
        """One claim on PostgreSQL, in one statement (:func:`inferd.jobs.pg.claim`): as
        :meth:`_claim_lite`."""
        async with self._one_statement() as conn:
            now = round(self._clock() * _US)
            expires = now + round(lease_seconds * _US)
            claimed = await pg.claim(
                conn,
                worker_id=worker_id,
                token=token,
                now=now,
                expires=expires,
                limit=limit,
                models=models,
            )
            late = round(self._clock() * _US)
            if claimed.rows and late - now > SLOW_CLAIM_US:
                # A slow claim (see claim_many): the leases count from now. The claim
                # has committed: if this fails, the leases stand as they were claimed.
                later = late + round(lease_seconds * _US)
                taken = [row.id for row in claimed.rows]
                with contextlib.suppress(*_UNAVAILABLE):
                    await pg.extend(conn, taken, token, later)
                    expires = later
        return claimed.rows, expires, claimed.overdue

    async def write(self, writes: Sequence[JobWrite]) -> list[list[Event] | None]:
        """Apply the writes of several leases in one transaction (group commit): a constant
        number of statements however many leases and events. Each write is fenced on its own
        lease, inside the transaction, exactly as :meth:`append` and :meth:`complete` are: a
        write whose lease is no longer valid changes nothing and gets None."""
        if not writes:
            return []
        ids = [w.lease.request_id for w in writes]
        if len(set(ids)) != len(ids):
            raise ValueError("at most one write per lease in a batch")
        if self._postgres:  # one statement, one round trip (see inferd.jobs.pg)
            async with self._one_statement() as conn:
                return await pg.group_write(conn, writes, round(self._clock() * _US))
        assert self._lite is not None  # SQLite: one hand-off to a thread (inferd.jobs.lite)
        # Streamed chunks alone (a follower waits for them): before what else waits.
        return await self._lite.write(writes, self._clock, urgent=not any(w.done for w in writes))

    async def heartbeat(self, lease: Lease, lease_seconds: float) -> bool:
        """Extend the lease. False if it was lost, or if the request was cancelled (then the
        lease is still extended, so that the worker has time to call finish_cancelled)."""
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        if self._lite is not None:
            # One hand-off to the writer's thread: through the general path's several round
            # trips (each a turn of the busy event loop) the write lock was held ~25 ms, and
            # a streamed chunk waited for it.
            async with self._available():
                going = await self._lite.heartbeat(
                    lease.request_id, lease.token, lease_seconds, self._clock
                )
            return bool(going)
        async with self._write() as tx:
            held = await tx.hold(lease)
            if held is None:
                return False
            await tx.conn.execute(
                update(jobs)
                .where(jobs.c.request_id == lease.request_id)
                .values(lease_expires_at=tx.now + round(lease_seconds * _US))
            )
            return not held.cancel_requested

    async def append(self, lease: Lease, data: dict[str, Any]) -> Event | None:
        """Store one ``response`` event (``sent_at`` added when missing); None if lease lost."""
        async with self._write() as tx:
            if await tx.hold(lease) is None:
                return None
            payload = {"sent_at": iso(tx.now)} | data
            return await tx.emit(lease.request_id, EventKind.RESPONSE, payload)

    async def complete(self, lease: Lease, result: Any) -> Event | None:
        """Mark succeeded with ``result`` (``done`` event); None if the lease was lost."""
        async with self._write() as tx:
            if await tx.hold(lease) is None:
                return None
            data = {"status": RequestStatus.SUCCEEDED.value, "result": result}
            return await tx.finish(
                lease.request_id, EventKind.DONE, data, result=result, error=None
            )

    async def fail(self, lease: Lease, error: str, retryable: bool = True) -> Event | None:
        """Requeue with backoff if retryable and attempts remain, else ``failed`` (not
        retryable) or ``dead`` (attempts exhausted); None if the lease was lost."""
        async with self._write() as tx:
            held = await tx.hold(lease)
            if held is None:
                return None
            rid = lease.request_id
            if not retryable or held.attempts >= held.max_attempts:
                status = RequestStatus.FAILED if not retryable else RequestStatus.DEAD
                data = {"status": status.value, "error": error}
                return await tx.finish(rid, EventKind.ERROR, data, error=error)
            if held.cancel_requested:
                return await tx.cancelled(rid)
            run_at = tx.now + round(self._backoff(held.attempts) * _US)
            return await tx.requeue(rid, run_at, error, error=error)

    async def release(self, lease: Lease) -> bool:
        """Requeue without burning an attempt (graceful shutdown); False if lease lost."""
        async with self._write() as tx:
            held = await tx.hold(lease)
            if held is None:
                return False
            if held.cancel_requested:
                await tx.cancelled(lease.request_id)
            else:
                reason = "worker shut down"
                await tx.requeue(lease.request_id, tx.now, reason, attempts_delta=-1)
            return True

    async def finish_cancelled(self, lease: Lease) -> Event | None:
        """Mark the request ``cancelled`` (``error`` event); None if the lease was lost."""
        async with self._write() as tx:
            if await tx.hold(lease) is None:
                return None
            return await tx.cancelled(lease.request_id)

    async def reap_expired(self) -> int:
        """Requeue jobs whose lease expired, or end them when they cannot run again."""
        async with self._write() as tx:
            return await tx.reap()

    async def counts(self) -> dict[str, int]:
        """Number of requests per status, every status included."""
        query = select(requests.c.status, func.count()).group_by(requests.c.status)
        async with self._read() as tx:
            rows = (await tx.conn.execute(query)).all()
        counts = {status.value: 0 for status in RequestStatus}
        counts.update({status: int(n) for status, n in rows})
        return counts

    # --- queue controls: expiry, deduplication, dead letters, retention ----------------------

    async def expire_due(self, limit: int = 100) -> list[tuple[str, Event]]:
        """End up to ``limit`` queued requests whose ``expires_at`` has passed as ``expired``:
        their job goes, an ``error`` event is stored. Returns (model, event) of each."""
        ended: list[tuple[str, Event]] = []
        async with self._read() as tx:  # most rounds find nothing: no write lock for them
            due = select(jobs.c.request_id).where(
                jobs.c.state == _QUEUED, jobs.c.expires_at <= tx.now
            )
            if (await tx.conn.execute(due.limit(1))).first() is None:
                return ended
        async with self._write() as tx:
            due = (
                select(jobs.c.request_id, jobs.c.model, jobs.c.expires_at)
                .where(jobs.c.state == _QUEUED, jobs.c.expires_at <= tx.now)
                .order_by(jobs.c.expires_at)
                .limit(limit)
            )
            if self._postgres:
                due = due.with_for_update(skip_locked=True)  # a claimer holds it: it is taken
            for request_id, model, expires in (await tx.conn.execute(due)).all():
                error = f"not started before it expired at {iso(expires)}"
                data = {"status": RequestStatus.EXPIRED.value, "error": error}
                event = await tx.finish(request_id, EventKind.ERROR, data, error=error)
                ended.append((model, event))
        return ended

    async def settle_joined(self, limit: int = 100) -> list[Event]:
        """Finish requests that joined one which has ended (see
        :meth:`inferd.jobs.types.QueueControls.settle_joined`); returns the events stored."""
        original = requests.alias("original")
        waiting = (
            select(requests.c.id, original.c.id.label("original_id"))
            .select_from(requests.outerjoin(original, original.c.id == requests.c.dedup_of))
            .where(
                requests.c.dedup_of.is_not(None),
                requests.c.status == _QUEUED,
                or_(original.c.id.is_(None), original.c.status.in_(_TERMINAL)),
            )
            .order_by(requests.c.created_at)
            .limit(limit)
        )
        stored: list[Event] = []
        async with self._read() as tx:  # most rounds find nothing: no write lock for them
            if (await tx.conn.execute(waiting.limit(1))).first() is None:
                return stored
        async with self._write() as tx:
            for joiner_id, original_id in (await tx.conn.execute(waiting)).all():
                joined = await tx.locked_request(joiner_id)
                if joined is None or joined.status != _QUEUED or joined.dedup_of is None:
                    continue  # cancelled (or settled) in the meantime
                ran = None if original_id is None else await tx.request_row(original_id)
                stored.extend(await tx.settle_joiner(joined, ran))
        return stored

    async def purge(self, older_than_seconds: float, limit: int = 500) -> int:
        """Delete up to ``limit`` terminal requests that finished more than
        ``older_than_seconds`` ago, with their events (one short transaction)."""
        if older_than_seconds < 0 or limit < 1:
            raise ValueError("older_than_seconds must be >= 0 and limit >= 1")
        async with self._write() as tx:
            cutoff = tx.now - round(older_than_seconds * _US)
            old = (
                select(requests.c.id)
                .where(requests.c.finished_at < cutoff, requests.c.status.in_(_TERMINAL))
                .order_by(requests.c.finished_at)
                .limit(limit)
            )
            if self._postgres:
                old = old.with_for_update(skip_locked=True)  # another purger has those
            ids = list((await tx.conn.execute(old)).scalars())
            if not ids:
                return 0
            await tx.conn.execute(delete(charges).where(charges.c.request_id.in_(ids)))
            gone = await tx.conn.execute(
                delete(requests).where(
                    requests.c.id.in_(ids), requests.c.status.in_(_TERMINAL)
                )  # the events go with them (ON DELETE CASCADE)
            )
            return int(gone.rowcount)

    async def dead_letters(
        self,
        statuses: list[RequestStatus],
        model: str | None = None,
        cursor: str | None = None,
        limit: int = 20,
    ) -> Page:
        """Every user's requests in ``statuses`` (of ``model`` if given), newest first,
        keyset-paginated like :meth:`page`."""
        if not 1 <= limit <= _MAX_PAGE:
            raise BadRequest(f"limit must be between 1 and {_MAX_PAGE}, not {limit}")
        query = select(requests).where(requests.c.status.in_([s.value for s in statuses]))
        if model is not None:
            query = query.where(requests.c.model == model)
        return await self._page_of(query, cursor, limit)

    async def requeue(self, request_id: str, attempts: int) -> tuple[RequestRecord, Event] | None:
        """Queue a dead, failed or expired request again, with ``attempts`` more attempts
        (its expiry cleared); None if there is no such request."""
        if attempts < 1:
            raise BadRequest("attempts must be at least 1")
        async with self._write() as tx:
            row = await tx.locked_request(request_id)
            if row is None:
                return None
            if RequestStatus(row.status) not in REQUEUEABLE:
                allowed = ", ".join(sorted(s.value for s in REQUEUEABLE))
                raise InvalidState(
                    f"request {request_id!r} is {row.status}; only {allowed} requests can be "
                    "queued again"
                )
            job = {"request_id": request_id, "model": row.model, "state": _QUEUED}
            await tx.conn.execute(jobs.insert(), job | {"run_at": tx.now})
            values = {
                "status": _QUEUED,
                "max_attempts": row.attempts + attempts,
                "finished_at": None,
                "expires_at": None,
                "cancel_requested": False,
                "dedup_of": None,  # a request that had joined another now runs on its own
            }
            bumped = await tx.bump(request_id, values)
            data = {"status": _QUEUED, "attempt": bumped.attempts, "reason": "requeued by an admin"}
            event = await tx.insert_event(
                request_id, bumped.last_seq, bumped.attempts, EventKind.STATUS, data
            )
            changed = await tx.request_row(request_id)
            assert changed is not None  # locked and changed in this very transaction
            return await tx.record(changed), event

    async def _page_of(self, query: Any, cursor: str | None, limit: int) -> Page:
        """The requests of ``query``, newest first, keyset-paginated on (created_at, id)."""
        if cursor is not None:
            created_us, last_id = decode_cursor(cursor)
            position = tuple_(requests.c.created_at, requests.c.id)
            query = query.where(position < tuple_(created_us, last_id))
        newest_first = (requests.c.created_at.desc(), requests.c.id.desc())
        query = query.order_by(*newest_first).limit(limit + 1)  # one more: is there a next?
        async with self._read() as tx:
            rows = list((await tx.conn.execute(query)).all())
            more = len(rows) > limit
            rows = rows[:limit]
            responses = await tx.responses(rows)
        items = [to_record(row._mapping, responses.get(row.id, [])) for row in rows]
        last = rows[-1] if more else None
        return Page(items, None if last is None else encode_cursor(last.created_at, last.id))

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self._backoff_max, self._backoff_base * 2.0 ** min(attempt - 1, 62))
        return ceiling * random.uniform(0.5, 1.0)


class _Tx:
    """One transaction of the store: its connection, and the instant it acts at."""

    def __init__(self, conn: AsyncConnection, now: int, postgres: bool) -> None:
        self.conn = conn
        self.now = now
        self.postgres = postgres

    async def request_row(self, request_id: str, user: str | None = None) -> _Row | None:
        query = select(requests).where(requests.c.id == request_id)
        if user is not None:
            query = query.where(requests.c.user_id == user)
        return (await self.conn.execute(query)).first()

    async def record(self, row: _Row) -> RequestRecord:
        responses = await self.responses([row])
        return to_record(row._mapping, responses.get(row.id, []))

    async def responses(self, rows: Sequence[_Row]) -> dict[str, list[dict[str, Any]]]:
        """The ``response`` events of each request's latest attempt, oldest first."""
        if not rows:
            return {}
        latest = tuple_(events.c.request_id, events.c.attempt).in_(
            [(row.id, row.attempts) for row in rows]
        )
        query = (
            select(events.c.request_id, events.c.data, events.c.created_at)
            .where(latest, events.c.kind == EventKind.RESPONSE.value)
            .order_by(events.c.request_id, events.c.seq)
        )
        found: dict[str, list[dict[str, Any]]] = {}
        for row in await self.conn.execute(query):
            sent_at = row.data.get("sent_at") or iso(row.created_at)
            found.setdefault(row.request_id, []).append(
                {"response": row.data.get("response"), "sent_at": sent_at}
            )
        return found

    async def state(self, request_id: str) -> _Row:
        """What decides a request's next step: attempts, max_attempts, cancel_requested."""
        query = select(
            requests.c.attempts, requests.c.max_attempts, requests.c.cancel_requested
        ).where(requests.c.id == request_id)
        return (await self.conn.execute(query)).one()

    async def lock_job(self, request_id: str) -> None:
        # The job row is the first lock of every change to a request (see the module doc).
        query = select(jobs.c.request_id).where(jobs.c.request_id == request_id)
        await self.conn.execute(query.with_for_update())

    async def hold(self, lease: Lease) -> _Row | None:
        """Lock the lease's job if the lease is still valid: its request's state, else None."""
        valid = select(jobs.c.request_id).where(
            jobs.c.request_id == lease.request_id,
            jobs.c.state == _RUNNING,
            jobs.c.lease_token == lease.token,
            jobs.c.lease_expires_at > self.now,
        )
        if (await self.conn.execute(valid.with_for_update())).first() is None:
            return None
        # A separate statement: on PostgreSQL it sees whatever committed while we waited for
        # the lock (a cancel, say), which a join in the locking statement would not.
        return await self.state(lease.request_id)

    async def bump(
        self, request_id: str, values: dict[str, Any], extra: Sequence[Any] = ()
    ) -> _Row:
        """Apply ``values`` to the request and take its next event seq, in one statement."""
        stmt = (
            update(requests)
            .where(requests.c.id == request_id)
            .values(updated_at=self.now, last_seq=requests.c.last_seq + 1, **values)
            .returning(requests.c.last_seq, requests.c.attempts, *extra)
        )
        return (await self.conn.execute(stmt)).one()

    async def insert_created(self, items: Sequence[_Create]) -> None:
        """Store new requests (``row`` gets its id, times and expiry), their jobs, their first
        events and their charges: four statements however many requests, after one count per
        queue bound that the batch adds to (QueueFull / TooManyQueued if it would go past)."""
        await self.admit_many(items)
        for item in items:
            item.row.update(
                id=new_request_id(self.now // 1000),
                created_at=self.now,
                updated_at=self.now,
                expires_at=_expiry(self.now, item.expires_at, item.ttl_seconds),
            )
        await self.conn.execute(requests.insert(), [item.row for item in items])
        await self.conn.execute(
            jobs.insert(),
            [
                {
                    "request_id": item.row["id"],
                    "model": item.row["model"],
                    "state": _QUEUED,
                    "run_at": self.now,
                    "expires_at": item.row["expires_at"],
                    "key_id": item.limits.key_id if item.limits is not None else None,
                }
                for item in items
            ],
        )
        first = {"status": _QUEUED, "attempt": 0}
        await self.conn.execute(
            events.insert(),
            [self.event_row(item.row["id"], 1, 0, EventKind.STATUS, first) for item in items],
        )
        owed = [{"request_id": item.row["id"], **item.charge} for item in items if item.charge]
        if owed:
            await self.conn.execute(charges.insert(), owed)

    async def admit_many(self, items: Sequence[_Create]) -> None:
        """:meth:`admit` for a batch of creates: each bound counted once, with what the batch
        itself adds to it."""
        adding: dict[tuple[str, str | None], tuple[QueueLimits, int]] = {}
        for item in items:
            if item.limits is None:
                continue
            key = (item.row["model"], item.limits.key_id)
            limits, n = adding.get(key, (item.limits, 0))
            adding[key] = (limits, n + 1)
        by_model: dict[str, int] = {}
        for (model, _), (_, n) in adding.items():
            by_model[model] = by_model.get(model, 0) + n
        for (model, _), (limits, n) in adding.items():
            await self.admit(model, limits, adding=n, adding_model=by_model[model])

    async def insert_event(
        self, request_id: str, seq: int, attempt: int, kind: EventKind, data: dict[str, Any]
    ) -> Event:
        """Store an event whose ``seq`` the request row has taken (see :meth:`bump`)."""
        row = self.event_row(request_id, seq, attempt, kind, data)
        await self.conn.execute(events.insert(), row)
        return to_event(row)

    def event_row(
        self, request_id: str, seq: int, attempt: int, kind: EventKind, data: dict[str, Any]
    ) -> dict[str, Any]:
        """The row of an event, to insert with others in one statement."""
        return {
            "request_id": request_id,
            "seq": seq,
            "kind": kind.value,
            "attempt": attempt,
            "data": data,
            "created_at": self.now,
        }

    async def emit(
        self, request_id: str, kind: EventKind, data: dict[str, Any], **values: Any
    ) -> Event:
        """Change the request with ``values`` and store one event, with the next seq."""
        bumped = await self.bump(request_id, values)
        return await self.insert_event(request_id, bumped.last_seq, bumped.attempts, kind, data)

    async def finish(
        self, request_id: str, kind: EventKind, data: dict[str, Any], **values: Any
    ) -> Event:
        """End the request with ``data["status"]``: its job goes, a terminal event is stored."""
        await self.conn.execute(jobs.delete().where(jobs.c.request_id == request_id))
        ended = {"status": data["status"], "finished_at": self.now, **values}
        return await self.emit(request_id, kind, data, **ended)

    async def cancelled(self, request_id: str) -> Event:
        """End the request as cancelled by its user."""
        data = {"status": RequestStatus.CANCELLED.value, "error": CANCELLED_BY_USER}
        values = {"error": CANCELLED_BY_USER, "cancel_requested": True}
        return await self.finish(request_id, EventKind.ERROR, data, **values)

    async def requeue(
        self, request_id: str, run_at: int, reason: str, *, attempts_delta: int = 0, **values: Any
    ) -> Event:
        """Put the job back in the queue, due at ``run_at`` (a ``status`` event)."""
        await self.conn.execute(
            update(jobs)
            .where(jobs.c.request_id == request_id)
            .values(
                state=_QUEUED,
                run_at=run_at,
                lease_token=None,
                lease_expires_at=None,
                worker_id=None,
            )
        )
        values["status"] = _QUEUED
        if attempts_delta:
            values["attempts"] = requests.c.attempts + attempts_delta
        bumped = await self.bump(request_id, values)
        data: dict[str, Any] = {"status": _QUEUED, "attempt": bumped.attempts, "reason": reason}
        if run_at > self.now:
            data["retry_at"] = iso(run_at)
        seq, attempt = bumped.last_seq, bumped.attempts
        return await self.insert_event(request_id, seq, attempt, EventKind.STATUS, data)

    # --- queue controls ---------------------------------------------------------------------

    async def admit(
        self, model: str, limits: QueueLimits, adding: int = 1, adding_model: int | None = None
    ) -> None:
        """Raise QueueFull or TooManyQueued when ``adding`` new jobs (of this key; of the
        model: ``adding_model``, default the same) would be past a bound. On SQLite the write
        lock makes the count exact; on PostgreSQL concurrent submits may overshoot a bound by
        the number of them in flight (no lock is taken for it)."""
        bounds = (
            (
                limits.max_queued,
                jobs.c.model == model,
                QueueFull,
                f"model {model!r}",
                adding if adding_model is None else adding_model,
            ),
            (
                limits.max_queued_per_key,
                jobs.c.key_id == limits.key_id,
                TooManyQueued,
                "key",
                adding,
            ),
        )
        for bound, where, error, whose, added in bounds:
            if bound is None or (error is TooManyQueued and limits.key_id is None):
                continue
            capped = select(literal(1)).where(where, jobs.c.state == _QUEUED).limit(bound)
            queued = await self.conn.execute(select(func.count()).select_from(capped.subquery()))
            if queued.scalar_one() + added > bound:
                if error is QueueFull:
                    message = (
                        f"the queue of {whose} is full ({bound} requests waiting); nothing "
                        "was stored: retry after Retry-After seconds"
                    )
                else:
                    message = (
                        f"this API key has {bound} requests waiting already (the most it may "
                        "have); nothing was stored: retry once some have started"
                    )
                raise error(message, retry_after=limits.retry_after)

    async def locked_request(self, request_id: str) -> _Row | None:
        """The request's row, locked until the end of the transaction (PostgreSQL; SQLite's
        write lock covers it). Its job row, if any, is locked first (the lock order)."""
        await self.lock_job(request_id)
        query = select(requests).where(requests.c.id == request_id)
        if self.postgres:
            query = query.with_for_update()
        return (await self.conn.execute(query)).first()

    async def duplicate(self, dedup_hash: str, since: int) -> _Row | None:
        """The request that a new one with ``dedup_hash`` can reuse: the newest that ran and
        succeeded at or after ``since``, else the oldest queued or running one that runs
        itself (not one that joined another)."""
        done = (
            select(requests)
            .where(
                requests.c.dedup_hash == dedup_hash,
                requests.c.status == _SUCCEEDED,
                requests.c.finished_at >= since,
                requests.c.dedup_of.is_(None),  # a result is as old as the run that made it
            )
            .order_by(requests.c.finished_at.desc())
            .limit(1)
        )
        found = (await self.conn.execute(done)).first()
        if found is not None:
            return found
        running = (
            select(requests)
            .where(
                requests.c.dedup_hash == dedup_hash,
                requests.c.status.in_((_QUEUED, _RUNNING)),
                requests.c.dedup_of.is_(None),
            )
            .order_by(requests.c.created_at)
            .limit(1)
        )
        return (await self.conn.execute(running)).first()

    async def deduplicated(self, original: _Row, fields: dict[str, Any]) -> RequestRecord:
        """Store a request answered by ``original``: finished with its result and responses
        when it succeeded, else queued behind it without a job (it joins the run)."""
        row: dict[str, Any] = fields | {
            "id": new_request_id(self.now // 1000),
            "attempts": 0,
            "cancel_requested": False,
            "error": None,
            "created_at": self.now,
            "updated_at": self.now,
            "dedup_of": original.id,
        }
        if original.status != _SUCCEEDED:
            row |= {"status": _QUEUED, "result": None, "last_seq": 1}
            row |= {"started_at": None, "finished_at": None}
            await self.conn.execute(requests.insert(), row)
            data = {"status": _QUEUED, "attempt": 0, "deduplicated_from": original.id}
            await self.insert_event(row["id"], 1, 0, EventKind.STATUS, data)
            return to_record(row, [])
        copied = await self.reused_events(original)
        row |= {"status": _SUCCEEDED, "result": original.result, "last_seq": len(copied)}
        row |= {"started_at": self.now, "finished_at": self.now}
        await self.conn.execute(requests.insert(), row)
        for seq, (kind, data) in enumerate(copied, 1):
            await self.insert_event(row["id"], seq, 0, kind, data)
        responses = [d for k, d in copied if k is EventKind.RESPONSE]
        return to_record(
            row, [{"response": d.get("response"), "sent_at": d.get("sent_at")} for d in responses]
        )

    async def reused_events(self, original: _Row) -> list[tuple[EventKind, dict[str, Any]]]:
        """What a request answered by ``original`` (succeeded) stores: the responses of its
        last attempt, then its ``done`` event marked with where it came from."""
        query = (
            select(events.c.data, events.c.created_at)
            .where(
                events.c.request_id == original.id,
                events.c.attempt == original.attempts,
                events.c.kind == EventKind.RESPONSE.value,
            )
            .order_by(events.c.seq)
        )
        copied: list[tuple[EventKind, dict[str, Any]]] = []
        for data, created_at in (await self.conn.execute(query)).all():
            copied.append((EventKind.RESPONSE, {"sent_at": iso(created_at)} | data))
        done = {"status": _SUCCEEDED, "result": original.result, "deduplicated_from": original.id}
        copied.append((EventKind.DONE, done))
        return copied

    async def settle_joiner(self, joined: _Row, original: _Row | None) -> list[Event]:
        """End (or start) a request that joined ``original``, which has ended (or is gone)."""
        status = None if original is None else RequestStatus(original.status)
        if original is not None and status is RequestStatus.SUCCEEDED:
            stored = []
            for kind, data in await self.reused_events(original):
                values: dict[str, Any] = {}
                if kind is EventKind.DONE:
                    values = {
                        "status": _SUCCEEDED,
                        "result": original.result,
                        "finished_at": self.now,
                    }
                    values["started_at"] = func.coalesce(requests.c.started_at, self.now)
                stored.append(await self.emit(joined.id, kind, data, **values))
            return stored
        if original is not None and status in (RequestStatus.FAILED, RequestStatus.DEAD):
            data = {
                "status": original.status,
                "error": original.error,
                "deduplicated_from": original.id,
            }
            return [await self.finish(joined.id, EventKind.ERROR, data, error=original.error)]
        # Cancelled, expired or deleted: it runs on its own after all.
        job = {"request_id": joined.id, "model": joined.model, "state": _QUEUED}
        await self.conn.execute(
            jobs.insert(), job | {"run_at": self.now, "expires_at": joined.expires_at}
        )
        ended = status.value if status is not None else "deleted"
        reason = f"the request it joined was {ended}; it runs on its own"
        data = {"status": _QUEUED, "attempt": joined.attempts, "reason": reason}
        return [await self.emit(joined.id, EventKind.STATUS, data, dedup_of=None)]

    async def reap(self) -> int:
        """Take back expired leases: requeue, or end the request if it cannot run again."""
        expired = (
            select(jobs.c.request_id)
            .where(jobs.c.state == _RUNNING, jobs.c.lease_expires_at <= self.now)
            .order_by(jobs.c.lease_expires_at)
            .limit(_REAP_BATCH)
        )
        if self.postgres:
            # Another claimer reaping the same rows is doing the same work: leave them to it.
            expired = expired.with_for_update(skip_locked=True)
        request_ids = list((await self.conn.execute(expired)).scalars())
        for request_id in request_ids:
            state = await self.state(request_id)
            if state.cancel_requested:
                await self.cancelled(request_id)
            elif state.attempts >= state.max_attempts:
                error = "lease expired on the last attempt"
                data = {"status": RequestStatus.DEAD.value, "error": error}
                await self.finish(request_id, EventKind.ERROR, data, error=error)
            else:
                await self.requeue(request_id, self.now, "lease expired")
        return len(request_ids)


def _leases(rows: Sequence[Any], token: str, expires: int) -> list[Lease]:
    """The leases of the requests a claim started (rows of their id, attempts, model, input,
    parameters, trace_context and whether they are charged)."""
    return [
        Lease(
            request_id=row.id,
            token=token,
            attempt=row.attempts,
            expires_at=to_datetime(expires),
            model=row.model,
            input=row.input,
            parameters=row.parameters,
            trace_context=row.trace_context,
            charged=bool(row.charged),
        )
        for row in rows
    ]


def _expiry(now: int, expires_at: float | None, ttl_seconds: float | None) -> int | None:
    """The stored ``expires_at`` (microseconds) of a request created at ``now``."""
    if expires_at is not None and ttl_seconds is not None:
        raise BadRequest("give expires_at or ttl_seconds, not both")
    if ttl_seconds is not None:
        if not ttl_seconds > 0:
            raise BadRequest("ttl_seconds must be a positive number of seconds")
        return now + round(ttl_seconds * _US)
    if expires_at is not None:
        return round(expires_at * _US)
    return None
