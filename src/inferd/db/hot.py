"""PostgreSQL connections of asyncpg's own, for the few statements on the hot path.

The long-running path runs three statements a thousand times a second and more (the group of
submits, a worker's claim and its group write, :mod:`inferd.jobs.pg`). Through SQLAlchemy's
async engine each one cost ~0.3-0.4 ms of the client's CPU beyond asyncpg's own work (a
greenlet, the pool's checkout and return, the compiled statement's parameters and the
result's rows), more than the statement itself costs the server: measured on one chunk
write on an idle machine, 472-630 µs of client CPU and 1.1-1.6 ms per call through the
engine, 152-208 µs and 0.7-0.9 ms on asyncpg directly (bench/README.md).

:class:`HotStatement` keeps a statement's SQL written once, as a SQLAlchemy ``text()``
with named parameters (what the plan tests prepare), compiled once to asyncpg's ``$n`` form.
:class:`HotConnections` is a small pool of asyncpg connections in autocommit (each statement
is its own transaction) with the server settings the statements are written for; asyncpg
prepares each statement once per connection.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import asyncpg
from sqlalchemy import URL
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql.elements import TextClause

__all__ = ["UNAVAILABLE", "HotConnections", "HotStatement"]

_DIALECT = postgresql.asyncpg.dialect()  # type: ignore[no-untyped-call]

UNAVAILABLE: tuple[type[BaseException], ...] = (
    asyncpg.exceptions.ConnectionDoesNotExistError,  # the connection was lost mid-call
    asyncpg.exceptions.PostgresConnectionError,  # SQLSTATE class 08
    asyncpg.exceptions.CannotConnectNowError,  # starting up or shutting down (57P03)
    asyncpg.exceptions.AdminShutdownError,  # 57P01
    asyncpg.exceptions.CrashShutdownError,  # 57P02
    asyncpg.exceptions.TooManyConnectionsError,  # 53300
    OSError,
    TimeoutError,
)
"""asyncpg's errors that mean the database cannot be reached or used now (the store turns
them into :class:`inferd.errors.StoreUnavailable`, as it does SQLAlchemy's)."""


class HotStatement:
    """A statement written as SQLAlchemy ``text()``, run on asyncpg directly: :meth:`fetch`
    takes the same named parameters."""

    __slots__ = ("names", "sql")

    def __init__(self, statement: TextClause) -> None:
        compiled = statement.compile(dialect=_DIALECT)
        assert compiled.positiontup is not None  # asyncpg's parameters are positional
        self.sql: str = compiled.string
        self.names: tuple[str, ...] = tuple(compiled.positiontup)

    async def fetch(self, conn: asyncpg.Connection, params: Mapping[str, Any]) -> list[Any]:
        rows: list[Any] = await conn.fetch(self.sql, *[params[name] for name in self.names])
        return rows


class HotConnections:
    """Up to ``size`` asyncpg connections to the database of ``url`` (a SQLAlchemy URL of
    the asyncpg driver), opened when first needed and kept. A connection that a call left in
    doubt (an error other than the server refusing the statement, or a cancellation) is
    closed, not reused."""

    def __init__(
        self,
        url: URL,
        size: int,
        *,
        connect_timeout: float,
        server_settings: Mapping[str, str],
    ) -> None:
        if size < 1:
            raise ValueError("size must be >= 1")
        _, options = _DIALECT.create_connect_args(url)  # type: ignore[no-untyped-call]
        self._options: dict[str, Any] = {
            **options,
            "timeout": connect_timeout,
            "server_settings": dict(server_settings),
        }
        self.size = size
        self._idle: list[asyncpg.Connection] = []
        self._open = 0  # connections open or being opened
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._loggers: list[Callable[[Any], None]] = []
        self._closed = False

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[asyncpg.Connection]:
        conn = await self._acquire()
        try:
            yield conn
        except asyncpg.PostgresError as exc:  # refused by the server: the connection is fine
            self._release(conn, broken=conn.is_closed() or isinstance(exc, UNAVAILABLE))
            raise
        except BaseException:
            self._release(conn, broken=True)
            raise
        else:
            self._release(conn, broken=False)

    async def warm(self, connections: int) -> None:
        """Open up to ``connections`` (at most :attr:`size`) now."""
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(max(1, min(connections, self.size))):
                await stack.enter_async_context(self.connection())

    def add_query_logger(self, callback: Callable[[Any], None]) -> None:
        """asyncpg's query logger on every connection, open now or later (for tests)."""
        self._loggers.append(callback)
        for conn in self._idle:
            conn.add_query_logger(callback)

    def remove_query_logger(self, callback: Callable[[Any], None]) -> None:
        self._loggers.remove(callback)
        for conn in self._idle:
            conn.remove_query_logger(callback)

    async def close(self) -> None:
        self._closed = True
        idle, self._idle = self._idle, []
        self._open -= len(idle)
        for conn in idle:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), timeout=2)
            if not conn.is_closed():
                conn.terminate()

    async def _acquire(self) -> asyncpg.Connection:
        while True:
            while self._idle:
                conn = self._idle.pop()
                if not conn.is_closed():
                    return conn
                self._open -= 1  # the server went away while it waited: open another
            if self._open < self.size:
                self._open += 1
                try:
                    conn = await asyncpg.connect(**self._options)
                except BaseException:
                    self._open -= 1
                    self._wake()
                    raise
                for callback in self._loggers:
                    conn.add_query_logger(callback)
                return conn
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken and cancelled at once: pass the turn on
                raise

    def _release(self, conn: asyncpg.Connection, *, broken: bool) -> None:
        if broken or self._closed or conn.is_closed():
            self._open -= 1
            conn.terminate()
        else:
            self._idle.append(conn)
        self._wake()

    def _wake(self) -> None:
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return
