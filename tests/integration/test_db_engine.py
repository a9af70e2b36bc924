"""The store's engine on a real PostgreSQL: pooled connections the server closed are replaced
at checkout, without a ping before every transaction; statements are planned for the tables
as they are now, not as they were when first prepared."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest

from inferd.db.migrate import migrate
from inferd.jobs.sql import HOT_SETTINGS, SqlStore
from tests.integration.conftest import PostgresServer, _dsn


async def _driver(conn: Any) -> Any:
    """The asyncpg connection under a SQLAlchemy one (its query logger, PREPARE, temp tables)."""
    raw = await conn.get_raw_connection()
    driver = raw.driver_connection
    assert driver is not None
    return driver


async def _terminate_backends(postgres_server: PostgresServer, url: str) -> int:
    database = url.rsplit("/", 1)[1]
    conn = await asyncpg.connect(_dsn(postgres_server.admin))
    try:
        killed = await conn.fetch(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE datname = $1 AND pid <> pg_backend_pid()",
            database,
        )
    finally:
        await conn.close()
    return len(killed)


async def test_connections_the_server_closed_are_replaced_without_a_failure(
    postgres_server: PostgresServer, database: str
) -> None:
    store = await SqlStore.connect(database, pool_size=3)
    try:
        await store.warm(3)
        record, _ = await store.create(user="alice", model="echo", input="hi", parameters={})
        # Three of each pool: the hot statements (the create below) have their own.
        assert await _terminate_backends(postgres_server, database) == 6
        await asyncio.sleep(0.2)  # the pooled connections see their sockets close
        for _ in range(4):  # every pooled connection, and then some
            assert (await store.get(record.id)) is not None
        again, _ = await store.create(user="alice", model="echo", input="hi", parameters={})
        assert again.id != record.id
    finally:
        await store.close()


async def test_a_transaction_costs_no_ping(database: str) -> None:
    """A read is BEGIN, its statement and COMMIT: no ping's BEGIN, query and ROLLBACK before
    it (three round trips, more than the statement itself)."""
    store = await SqlStore.connect(database, pool_size=1)
    try:
        await store.warm(1)
        record, _ = await store.create(user="alice", model="echo", input="hi", parameters={})
        sent: list[str] = []
        async with store.engine.connect() as conn:
            driver = await _driver(conn)
            driver.add_query_logger(lambda query: sent.append(query.query))
        await store.events(record.id)
        await store.get(record.id)
        # The queries the driver sent: no bare ";" ping among them.
        assert sent, "the query logger saw nothing"
        assert all(query.strip() not in ("", ";") for query in sent), sent
    finally:
        await store.close()


async def test_statements_are_planned_for_the_tables_as_they_are_now(database: str) -> None:
    """A statement prepared while a table was small must not keep the generic plan chosen
    then: run six times on an analyzed one-row table (PostgreSQL switches a prepared
    statement to a generic plan after five runs), then, once the table holds 50,000 rows
    (not analyzed again, as between two autovacuum rounds), a lookup of eight keys must use
    the primary key's index, not scan the table."""
    store = await SqlStore.connect(database, pool_size=1)
    try:
        async with store.engine.connect() as conn:
            driver = await _driver(conn)
            await driver.execute("CREATE TEMP TABLE grow (id varchar PRIMARY KEY, n int)")
            await driver.execute("INSERT INTO grow VALUES ('a', 1)")
            await driver.execute("ANALYZE grow")
            params = ", ".join(["varchar"] * 8)
            keys = ", ".join(f"${i}" for i in range(1, 9))  # as the store's batches look
            await driver.execute(
                f"PREPARE lookup({params}) AS SELECT n FROM grow WHERE id IN ({keys})"
            )
            small = ", ".join(f"'{key}'" for key in "abcdefgh")
            for _ in range(6):
                await driver.execute(f"EXECUTE lookup({small})")
            await driver.execute(
                "INSERT INTO grow SELECT 'k' || i, i FROM generate_series(1, 50000) AS i"
            )
            large = ", ".join(f"'k{i}'" for i in range(8))
            plan = "\n".join(
                row[0] for row in await driver.fetch(f"EXPLAIN EXECUTE lookup({large})")
            )
            assert "grow_pkey" in plan and "Seq Scan" not in plan, plan
            await driver.execute("DEALLOCATE lookup")
            await driver.execute("DROP TABLE grow")
    finally:
        await store.close()


def _literal(value: object) -> str:
    """A parameter of EXECUTE as SQL text (strings, integers, booleans, lists of them)."""
    if value is None:
        return "NULL"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, list):
        items = ",".join(
            "NULL" if item is None else '"' + str(item).replace('"', '\\"') + '"' for item in value
        )
        return "'{" + items + "}'"
    return "'" + str(value).replace("'", "''") + "'"


@pytest.mark.parametrize("analyzed", [True, False], ids=["analyzed", "not-analyzed-yet"])
async def test_the_hot_statements_generic_plans_follow_the_tables(
    database: str, analyzed: bool
) -> None:
    """The claim, the group write and the group of submits run with generic plans
    (inferd.jobs.pg), on connections with the store's settings for them. Made while the
    tables are empty, those plans use the tables' indexes once the tables have grown: no
    scan of the whole queue or of every request, whether autovacuum has analyzed the tables
    since (the plans are then made again) or not yet (they are kept: without
    ``enable_seqscan = off`` they scanned every request, ~30 ms per claim at 20,000)."""
    from sqlalchemy.dialects import postgresql

    from inferd.jobs import pg

    store = await SqlStore.connect(database, pool_size=1)
    dialect = postgresql.asyncpg.dialect()  # type: ignore[attr-defined]
    now = 1_800_000_000_000_000
    arguments = {
        "claim": {
            "now": now, "expires": now + 60_000_000, "token": "t", "worker": "w", "limit": 32,
            "models": None,
        },
        "write": {
            "ids": ["r1", "r2"], "tokens": ["t", "t"], "counts": [1, 2],
            "done": [False, True], "results": [None, "1"], "e_ids": ["r1", "r2", "r2"],
            "e_offs": [1, 1, 2], "e_kinds": ["response", "response", "done"],
            "e_data": ["{}", "{}", "{}"], "now": now,
        },
        "create": {
            "first": "{}", "now": now, "mb_models": ["m"], "mb_bounds": [10000],
            "mb_adding": [1], "kb_keys": ["k"], "kb_bounds": [100], "kb_adding": [1],
            "ids": ["n1"], "users": ["u"], "models": ["m"], "versions": [None],
            "inputs": ["1"], "parameters": ["{}"], "hashes": ["h"], "max_attempts": [3],
            "traces": ["null"], "expires": [None], "key_ids": ["k"], "c_ids": [],
            "c_keys": [], "c_users": [], "c_days": [], "c_reserved": [],
        },
    }  # fmt: skip
    arguments["create_plain"] = arguments["create"]  # the same without bounds and charges
    try:
        async with store.engine.connect() as conn:
            driver = await _driver(conn)
            for name, value in HOT_SETTINGS.items():
                await driver.execute(f"SET {name} = {_literal(value)}")
            statements = {
                "claim": pg._CLAIM,
                "write": pg._STATEMENT,
                "create": pg._CREATE,
                "create_plain": pg._CREATE_PLAIN,
            }
            for name, statement in statements.items():
                compiled = statement.compile(dialect=dialect)
                order = compiled.positiontup
                assert order is not None
                await driver.execute(f"PREPARE hot_{name} AS {compiled.string}")
                values = ", ".join(_literal(arguments[name][key]) for key in order)
                await driver.execute(f"BEGIN; EXECUTE hot_{name}({values}); ROLLBACK")
            await driver.execute(
                """
                INSERT INTO inferd_requests (id, user_id, model, parameters, body_hash, status,
                    attempts, max_attempts, cancel_requested, last_seq, created_at, updated_at)
                SELECT 'r' || i, 'u', 'm', '{}', 'h', 'queued', 0, 3, false, 1, i, i
                FROM generate_series(1, 20000) AS i;
                INSERT INTO inferd_jobs (request_id, model, state, run_at)
                SELECT 'r' || i, 'm', 'queued', i FROM generate_series(1, 20000) AS i;
                INSERT INTO inferd_events (request_id, seq, kind, attempt, data, created_at)
                SELECT 'r' || i, 1, 'status', 0, '{}', i FROM generate_series(1, 20000) AS i;
                """
            )
            if analyzed:
                await driver.execute(
                    "ANALYZE inferd_requests; ANALYZE inferd_jobs; ANALYZE inferd_events"
                )
            for name, statement in statements.items():
                order = statement.compile(dialect=dialect).positiontup
                assert order is not None
                values = ", ".join(_literal(arguments[name][key]) for key in order)
                plan = "\n".join(
                    row[0] for row in await driver.fetch(f"EXPLAIN EXECUTE hot_{name}({values})")
                )
                # The tables that grow with every request. (The group of submits counts the
                # queued jobs of a model up to its bound: where, as here, every job is one,
                # the first rows of any scan are the answer, with either kind of plan.)
                tables = ["inferd_requests", "inferd_events"]
                if not name.startswith("create"):
                    tables.append("inferd_jobs")
                for table in tables:
                    assert f"Seq Scan on {table}" not in plan, plan
                await driver.execute(f"DEALLOCATE hot_{name}")
    finally:
        await store.close()


_PARTIAL_LOOKUPS = {
    # index: a lookup of the kind the store makes (inferd.jobs.sql, inferd.jobs.pg)
    "ix_inferd_requests_dedup_hash": "SELECT id FROM inferd_requests WHERE dedup_hash = 'h'",
    "ix_inferd_requests_dedup_of": "SELECT id FROM inferd_requests WHERE dedup_of = 'r1'",
    "ix_inferd_requests_finished_at": "SELECT id FROM inferd_requests WHERE finished_at < 5",
    "ix_inferd_jobs_key_id_state": (
        "SELECT count(*) FROM inferd_jobs WHERE key_id = 'k' AND state = 'queued'"
    ),
    "ix_inferd_jobs_state_expires_at": (
        "SELECT request_id FROM inferd_jobs WHERE state = 'queued' AND expires_at <= 5"
    ),
}


async def test_indexes_of_mostly_null_columns_hold_only_values_and_serve_lookups(
    database: str,
) -> None:
    """Migration 0007: those indexes are partial (no entry for a row without a value), and
    the store's lookups on them still use them."""
    store = await SqlStore.connect(database, pool_size=1)
    try:
        async with store.engine.connect() as conn:
            driver = await _driver(conn)
            definitions = {
                row["indexname"]: row["indexdef"]
                for row in await driver.fetch("SELECT indexname, indexdef FROM pg_indexes")
            }
            await driver.execute("SET enable_seqscan = off")
            for index, lookup in _PARTIAL_LOOKUPS.items():
                assert "IS NOT NULL" in definitions[index], definitions[index]
                plan = "\n".join(row[0] for row in await driver.fetch(f"EXPLAIN {lookup}"))
                assert index in plan, plan
    finally:
        await store.close()


async def test_sqlite_indexes_of_mostly_null_columns_are_partial_and_used(tmp_path: Any) -> None:
    import sqlite3

    from inferd.db.engine import sqlite_url

    path = tmp_path / "partial.db"
    await migrate(sqlite_url(path))
    with sqlite3.connect(path) as db:
        sql = dict(db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'"))
        for index, lookup in _PARTIAL_LOOKUPS.items():
            assert "IS NOT NULL" in sql[index], sql[index]
            plan = " ".join(row[-1] for row in db.execute(f"EXPLAIN QUERY PLAN {lookup}"))
            assert index in plan, plan
