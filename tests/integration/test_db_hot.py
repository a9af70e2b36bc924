"""The hot statements' own asyncpg connections (inferd.db.hot) on a real PostgreSQL: at most
``size`` at once, the server settings they are written for, a connection lost mid-call
reported as the store being unavailable and replaced on the next call."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy import make_url, text

from inferd.db.hot import UNAVAILABLE, HotConnections, HotStatement
from inferd.errors import StoreUnavailable
from inferd.jobs.sql import SqlStore
from tests.integration.conftest import PostgresServer, _dsn


def _pool(url: str, size: int) -> HotConnections:
    return HotConnections(
        make_url(url),
        size,
        connect_timeout=5,
        server_settings={"plan_cache_mode": "force_generic_plan", "application_name": "hot"},
    )


async def test_a_statement_takes_named_parameters_and_the_settings_hold(database: str) -> None:
    pool = _pool(database, 2)
    statement = HotStatement(
        text("SELECT CAST(:a AS integer) + CAST(:b AS integer), current_setting(:name), :a")
    )
    try:
        async with pool.connection() as conn:
            rows = await statement.fetch(conn, {"a": 2, "b": 40, "name": "plan_cache_mode"})
        # (a name used twice is one parameter: the second ``:a`` is the integer too)
        assert [tuple(row) for row in rows] == [(42, "force_generic_plan", 2)]
    finally:
        await pool.close()


async def test_at_most_size_connections_and_the_others_wait(database: str) -> None:
    pool = _pool(database, 2)
    inside = 0
    most = 0

    async def one() -> int:
        nonlocal inside, most
        async with pool.connection() as conn:
            inside += 1
            most = max(most, inside)
            pid: int = await conn.fetchval("SELECT pg_backend_pid() FROM pg_sleep(0.02)")
            inside -= 1
            return pid

    try:
        pids = await asyncio.gather(*(one() for _ in range(10)))
        assert most == 2 and len(set(pids)) == 2
    finally:
        await pool.close()


async def test_a_refused_statement_keeps_the_connection_and_a_cancelled_one_does_not(
    database: str,
) -> None:
    pool = _pool(database, 1)
    try:
        async with pool.connection() as conn:
            first = await conn.fetchval("SELECT pg_backend_pid()")
        with pytest.raises(asyncpg.UndefinedTableError):
            async with pool.connection() as conn:
                await conn.fetch("SELECT * FROM no_such_table")
        async with pool.connection() as conn:
            assert await conn.fetchval("SELECT pg_backend_pid()") == first

        async def slow() -> None:
            async with pool.connection() as conn:
                await conn.fetch("SELECT pg_sleep(5)")

        task = asyncio.create_task(slow())
        await asyncio.sleep(0.2)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with pool.connection() as conn:  # a new one: the old one was mid-statement
            assert await conn.fetchval("SELECT pg_backend_pid()") != first
    finally:
        await pool.close()


async def test_a_connection_lost_mid_call_is_unavailable_then_replaced(
    postgres_server: PostgresServer, database: str
) -> None:
    store = await SqlStore.connect(database, pool_size=3)
    admin = await asyncpg.connect(_dsn(postgres_server.admin))
    try:
        await store.warm(3)
        assert store.hot is not None
        async with store.hot.connection() as conn:
            pid = await conn.fetchval("SELECT pg_backend_pid()")

        async def killed_while_running() -> None:
            async with store._one_statement() as conn:  # the store's own path
                await conn.fetch("SELECT pg_sleep(5)")

        task = asyncio.create_task(killed_while_running())
        await asyncio.sleep(0.3)
        await admin.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name = 'inferd' AND query LIKE '%pg_sleep(5)%'"
        )
        with pytest.raises(StoreUnavailable) as raised:
            await task
        assert isinstance(raised.value.__cause__, UNAVAILABLE)
        # The next calls run, on another connection where needed.
        record, _ = await store.create(user="alice", model="echo", input="hi", parameters={})
        (lease,) = await store.claim_many("w", 60, 1)
        assert lease.request_id == record.id
        assert pid is not None
    finally:
        await admin.close()
        await store.close()
