"""The database engine: URLs of both databases, configured the way inferd's stores rely on.

:func:`create_engine` is what every store, the migrations and the key store open; SQLite's
transactions begin with ``BEGIN IMMEDIATE`` (see :mod:`inferd.jobs.sql` for why).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import URL, event, make_url
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from inferd.errors import ConfigError

__all__ = ["UNAVAILABLE_ERRORS", "create_engine", "normalize_url", "sqlite_url"]


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
    plan_cache_mode: str = "force_custom_plan",
    autocommit: bool = False,
) -> AsyncEngine:
    """An async engine configured for the store (used by the migrations too).

    SQLite: creates the file's folder, hands transaction control to SQLAlchemy (the driver's
    own implicit BEGIN is turned off), begins write transactions with ``BEGIN IMMEDIATE``
    and read-only ones (execution option ``inferd_read_only``) with a plain ``BEGIN``.

    PostgreSQL: ``plan_cache_mode`` is the connections' setting of that name (see below for
    the default; the store's hot statements use ``force_generic_plan``); ``autocommit``
    runs every statement as its own transaction, with no BEGIN or COMMIT (those hot
    statements are each atomic by themselves).
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
    engine = create_async_engine(
        parsed,
        echo=echo,
        pool_size=pool_size,
        isolation_level="AUTOCOMMIT" if autocommit else None,
        connect_args={
            "timeout": connect_timeout,
            "server_settings": {
                "application_name": "inferd",
                # asyncpg prepares every statement, and PostgreSQL switches a prepared
                # statement to a generic plan after five runs if that looks no dearer. A
                # queue's tables start small: the generic plan chosen then (a sequential
                # scan of a table of a few thousand rows) stayed as the tables grew, and
                # every primary-key lookup scanned them. Measured: after a drain of 1,500
                # jobs, a flow of 1,000 submits/s fell to ~450 jobs/s within 20 s. Custom
                # plans cost a few tens of microseconds of planning per statement.
                "plan_cache_mode": plan_cache_mode,
            },
        },
    )
    # Not pool_pre_ping: on asyncpg its ping is three round trips (BEGIN, a query, ROLLBACK)
    # before every transaction, more than most of our transactions' own statements.
    event.listen(engine.sync_engine.pool, "checkout", _drop_closed)
    return engine


def _drop_closed(dbapi_connection: Any, _record: Any, _proxy: Any) -> None:
    """A pooled connection whose server went away (a restart, a terminated backend) is
    replaced at checkout, for free: asyncpg notices the closed socket while the connection
    waits in the pool. A connection that dies between checkout and use fails that one
    transaction (``StoreUnavailable``, a 503 with ``Retry-After``), and the pool then drops
    every connection opened before the failure."""
    connection = getattr(dbapi_connection, "_connection", None)
    if connection is not None and connection.is_closed():
        raise sa_exc.DisconnectionError("the database closed this connection")


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
