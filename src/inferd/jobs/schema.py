"""The database of long-running requests: its tables, its engine, its stored values.

Tables, shared by SQLite and PostgreSQL:

* ``inferd_requests``: one row per accepted request, its status and result. ``last_seq`` is
  the seq of its newest event: it is incremented in the same transaction as each event
  insert, which is what keeps ``seq`` gap-free per request.
* ``inferd_jobs``: the queue. A row exists exactly while its request is ``queued`` or
  ``running``; it is deleted when the request reaches a terminal status, so the queue scans
  stay small however many finished requests are kept.
* ``inferd_events``: the event log of each request, keyed by (request_id, seq).

Times are integers of microseconds since the epoch (UTC): they compare exactly and the same
way on both databases, which floats and time zones would not guarantee.

The tables carry an ``inferd_`` prefix (and the migration history its own version table) so
that they can live in a PostgreSQL database shared with other applications. A change here
needs a new migration in ``inferd/migrations/versions``; a test checks that they agree.

Stored values: times, body hashes, rows to records.

Engine: :func:`create_engine` configures both databases the way the store relies on (see
:mod:`inferd.jobs.sql` for why SQLite's transactions begin with ``BEGIN IMMEDIATE``).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import (
    JSON,
    URL,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    event,
    make_url,
)
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from inferd.errors import BadRequest, ConfigError
from inferd.jobs.types import Event, EventKind, RequestRecord, RequestStatus

__all__ = [
    "UNAVAILABLE_ERRORS",
    "VERSION_TABLE",
    "body_hash",
    "create_engine",
    "events",
    "iso",
    "jobs",
    "metadata",
    "normalize_url",
    "requests",
    "sqlite_url",
    "to_datetime",
    "to_event",
    "to_record",
]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)

VERSION_TABLE = "inferd_alembic_version"
"""Alembic's version table for these tables (not the default name, which an application
sharing the database may use for its own migrations)."""

# Constraint names must be deterministic for migrations to be able to refer to them.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

requests = Table(
    "inferd_requests",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("user_id", String(255), nullable=False),
    Column("model", String(255), nullable=False),
    Column("version", String(255), nullable=True),
    # Any JSON value, null included (stored as JSON null, not SQL NULL).
    Column("input", JSON, nullable=True),
    Column("parameters", JSON, nullable=False),
    # sha256 of the canonical JSON of (model, version, input, parameters): what an
    # idempotent retry must match.
    Column("body_hash", String(64), nullable=False),
    Column("idempotency_key", String(255), nullable=True),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("result", JSON, nullable=True),
    Column("error", Text, nullable=True),
    Column("cancel_requested", Boolean, nullable=False),
    Column("last_seq", Integer, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("started_at", BigInteger, nullable=True),
    Column("finished_at", BigInteger, nullable=True),
    # NULL keys are distinct on both databases: requests without a key never collide.
    UniqueConstraint("user_id", "idempotency_key"),
    CheckConstraint(
        "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'dead')",
        name="status",
    ),
    # Keyset pagination of one user's requests, newest first.
    Index(None, "user_id", "created_at", "id"),
    Index(None, "status"),
)

jobs = Table(
    "inferd_jobs",
    metadata,
    Column(
        "request_id",
        String(40),
        ForeignKey(requests.c.id, ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("model", String(255), nullable=False),
    Column("state", String(16), nullable=False),
    Column("run_at", BigInteger, nullable=False),
    Column("lease_token", String(64), nullable=True),
    Column("lease_expires_at", BigInteger, nullable=True),
    Column("worker_id", String(255), nullable=True),
    CheckConstraint("state IN ('queued', 'running')", name="state"),
    # claim: the oldest due queued job; reap: running jobs by lease expiry.
    Index(None, "state", "run_at", "request_id"),
    Index(None, "state", "lease_expires_at"),
)

events = Table(
    "inferd_events",
    metadata,
    Column(
        "request_id",
        String(40),
        ForeignKey(requests.c.id, ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("seq", Integer, primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("data", JSON, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)


# --- stored values ----------------------------------------------------------------------------


def to_datetime(us: int) -> datetime:
    """A stored time (microseconds since the epoch) as a tz-aware UTC datetime."""
    return _EPOCH + timedelta(microseconds=us)


def iso(us: int) -> str:
    """A stored time as ISO-8601 text in UTC (``2025-01-31T12:00:00.000000Z``)."""
    return to_datetime(us).isoformat(timespec="microseconds").replace("+00:00", "Z")


def body_hash(model: str, version: str | None, input: Any, parameters: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a request body (sorted keys, no spaces)."""
    try:
        canonical = json.dumps(
            {"model": model, "version": version, "input": input, "parameters": parameters},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"input and parameters must be plain JSON values: {exc}") from None
    return hashlib.sha256(canonical.encode()).hexdigest()


def to_record(row: Mapping[Any, Any], responses: list[dict[str, Any]]) -> RequestRecord:
    """The record of a stored ``inferd_requests`` row (a row's ``_mapping``)."""
    started, finished = row["started_at"], row["finished_at"]
    return RequestRecord(
        id=row["id"],
        user=row["user_id"],
        model=row["model"],
        version=row["version"],
        input=row["input"],
        parameters=row["parameters"],
        status=RequestStatus(row["status"]),
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        result=row["result"],
        error=row["error"],
        created_at=to_datetime(row["created_at"]),
        updated_at=to_datetime(row["updated_at"]),
        started_at=None if started is None else to_datetime(started),
        finished_at=None if finished is None else to_datetime(finished),
        cancel_requested=bool(row["cancel_requested"]),
        idempotency_key=row["idempotency_key"],
        last_seq=row["last_seq"],
        responses=responses,
    )


def to_event(row: Mapping[Any, Any]) -> Event:
    """The event of a stored ``inferd_events`` row (a row's ``_mapping``)."""
    return Event(
        request_id=row["request_id"],
        seq=row["seq"],
        kind=EventKind(row["kind"]),
        data=row["data"],
        attempt=row["attempt"],
        created_at=to_datetime(row["created_at"]),
    )


# --- engine -------------------------------------------------------------------------------------


def normalize_url(url: str | URL) -> URL:
    """The URL with its async driver: ``sqlite://`` gets aiosqlite, ``postgresql://`` asyncpg."""
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.drivername == "sqlite":
            parsed = parsed.set(drivername="sqlite+aiosqlite")
        if parsed.database in (None, "", ":memory:") or parsed.query.get("mode") == "memory":
            # Connections of an in-memory database would share one DBAPI connection, whose
            # transactions interleave; every part of inferd expects a file it can share.
            raise ConfigError("the SQLite request store needs a file, not an in-memory database")
    elif backend in ("postgresql", "postgres"):
        if parsed.drivername in ("postgresql", "postgres"):
            parsed = parsed.set(drivername="postgresql+asyncpg")
    else:
        raise ConfigError(f"unsupported database {backend!r}: use sqlite or postgresql")
    return parsed


def sqlite_url(path: str | Path) -> str:
    """The URL of the SQLite store at ``path`` (relative paths are relative to the cwd)."""
    return URL.create("sqlite+aiosqlite", database=str(path)).render_as_string()


def create_engine(
    url: str | URL,
    *,
    pool_size: int = 5,
    busy_timeout: float = 5.0,
    connect_timeout: float = 10.0,
    echo: bool = False,
) -> AsyncEngine:
    """An async engine configured for the store (used by the migrations too).

    SQLite: creates the file's folder, hands transaction control to SQLAlchemy (the driver's
    own implicit BEGIN is turned off), begins write transactions with ``BEGIN IMMEDIATE``
    and read-only ones (execution option ``inferd_read_only``) with a plain ``BEGIN``.
    """
    parsed = normalize_url(url)
    if parsed.get_backend_name() == "sqlite":
        assert parsed.database is not None  # normalize_url refuses the in-memory forms
        Path(parsed.database).expanduser().parent.mkdir(parents=True, exist_ok=True)
        # sqlite3's ``timeout`` is SQLite's busy timeout: how long a writer waits for
        # another process's write lock before "database is locked".
        engine = create_async_engine(
            parsed,
            echo=echo,
            pool_size=pool_size,
            connect_args={"timeout": busy_timeout},
        )
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_on_begin)
        return engine
    return create_async_engine(
        parsed,
        echo=echo,
        pool_size=pool_size,
        pool_pre_ping=True,  # a restarted server leaves dead connections in the pool
        connect_args={
            "timeout": connect_timeout,
            "server_settings": {"application_name": "inferd"},
        },
    )


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # None: the driver emits no BEGIN of its own, _sqlite_on_begin does.
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    try:
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")  # durable at checkpoints; safe in WAL
        cursor.execute("PRAGMA foreign_keys=ON")
    finally:
        cursor.close()


def _sqlite_on_begin(connection: Any) -> None:
    if connection.get_execution_options().get("inferd_read_only"):
        connection.exec_driver_sql("BEGIN")
    else:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    sa_exc.OperationalError,
    sa_exc.InterfaceError,
    sa_exc.TimeoutError,  # no pooled connection became free in time
    OSError,  # asyncpg's connect raises ConnectionRefusedError and friends unwrapped
    TimeoutError,
)
"""Exceptions that mean the database cannot be reached or used now (not that the call is
wrong): the store turns them into :class:`inferd.errors.StoreUnavailable`."""


# API keys (see inferd.tenancy.keys): only a SHA-256 of each key is stored.
api_keys = Table(
    "inferd_api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("user_id", String(255), nullable=False, index=True),
    Column("name", String(255), nullable=True),
    Column("scopes", String(255), nullable=False),
    Column("rate", String(32), nullable=True),
    Column("daily_tokens", BigInteger, nullable=True),
    Column("secret_hash", String(64), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
)

# Usage per key, model and UTC day: what the daily budgets charged, kept for billing.
usage = Table(
    "inferd_usage",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("model", String(255), primary_key=True),
    Column("day", String(10), primary_key=True),
    Column("user_id", String(255), nullable=False),
    Column("requests", BigInteger, nullable=False),
    Column("tokens", BigInteger, nullable=False),
)

# Budget reserved by a long-running request, settled when it ends.
charges = Table(
    "inferd_request_charges",
    metadata,
    Column("request_id", String(40), primary_key=True),
    Column("key_id", String(32), nullable=False),
    Column("user_id", String(255), nullable=False),
    Column("day", String(10), nullable=False),
    Column("reserved", BigInteger, nullable=False),
)
