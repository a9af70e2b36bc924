"""Fixtures of the integration tier that need real services on loopback.

``postgres_url``: a throwaway PostgreSQL database, created and migrated once per session and
dropped at the end. Where PostgreSQL cannot be reached the test is skipped, unless
``INFERD_TEST_REQUIRE_SERVICES=1`` (CI), where that is a failure. The server is the one at
``INFERD_TEST_POSTGRES_URL`` (default: ``postgres`` on 127.0.0.1:5432, trust auth).
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
from sqlalchemy import URL, make_url
from sqlalchemy.dialects import postgresql

from inferd.db.engine import sqlite_url
from inferd.db.migrate import migrate

# Read at import: the autouse fixture of tests/conftest.py clears INFERD_* for each test.
ADMIN_URL = make_url(
    os.environ.get("INFERD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
)
REQUIRE_SERVICES = os.environ.get("INFERD_TEST_REQUIRE_SERVICES") == "1"


def _quote(identifier: str) -> str:
    # CREATE/DROP DATABASE take no bound parameters: quote the name as an identifier.
    return str(postgresql.dialect().identifier_preparer.quote_identifier(identifier))


def _dsn(url: URL) -> str:
    return url.set(drivername="postgresql").render_as_string(hide_password=False)


class PostgresServer:
    """The PostgreSQL server of the tests: makes and drops throwaway databases."""

    def __init__(self, admin: URL) -> None:
        self.admin = admin

    def url(self, database: str) -> str:
        """The async URL of ``database`` on this server."""
        return (
            self.admin.set(drivername="postgresql+asyncpg", database=database)
        ).render_as_string(hide_password=False)

    async def _admin(self, sql: str) -> None:
        import asyncpg  # here, not at import: the other integration tests do not need it

        conn = await asyncpg.connect(_dsn(self.admin), timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def create_database(self) -> str:
        """A new empty database; its name is ``inferd_test_<random hex>``."""
        name = f"inferd_test_{secrets.token_hex(6)}"
        await self._admin("CREATE DATABASE " + _quote(name))
        return name

    async def drop_database(self, name: str) -> None:
        """Drop ``name``, closing whatever connections are still open to it."""
        await self._admin("DROP DATABASE IF EXISTS " + _quote(name) + " WITH (FORCE)")


@pytest.fixture(scope="session")
def postgres_server() -> PostgresServer:
    """The reachable PostgreSQL server (skip, or fail under INFERD_TEST_REQUIRE_SERVICES=1)."""
    server = PostgresServer(ADMIN_URL)
    try:
        asyncio.run(server._admin("SELECT 1"))
    except Exception as exc:  # not installed, refused, timed out, authentication...
        message = f"PostgreSQL is not reachable at {ADMIN_URL!r}: {exc!r}"
        if REQUIRE_SERVICES:
            pytest.fail(message)
        pytest.skip(message)
    return server


@pytest.fixture(scope="session")
def postgres_url(postgres_server: PostgresServer) -> Iterator[str]:
    """The async URL of a migrated throwaway database, shared by the session's tests."""
    name = asyncio.run(postgres_server.create_database())
    url = postgres_server.url(name)
    try:
        asyncio.run(migrate(url))
        yield url
    finally:
        asyncio.run(postgres_server.drop_database(name))


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file; tests copy it rather than migrating their own."""
    path = tmp_path_factory.mktemp("sqlite-template") / "inferd.db"
    asyncio.run(migrate(sqlite_url(path)))
    return path


@pytest.fixture
async def database(postgres_server: PostgresServer) -> AsyncIterator[str]:
    """A new PostgreSQL database of its own, migrated; its URL (dropped afterwards)."""
    name = await postgres_server.create_database()
    try:
        url = postgres_server.url(name)
        await migrate(url)
        yield url
    finally:
        await postgres_server.drop_database(name)
