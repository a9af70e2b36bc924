"""Bring inferd's database to the newest schema, from inside the process.

Alembic is synchronous; :func:`migrate` opens the store's async engine and runs Alembic on
the connection with ``run_sync``, so no synchronous database driver is needed. The whole
upgrade is one transaction (both databases have transactional DDL): it applies completely or
not at all. On SQLite, foreign keys are off on the migration's connection (a pragma that must
be set outside a transaction): a table rebuilt by a migration is dropped and renamed, and with
them on, dropping it would delete the rows that refer to it. Processes that start together do
not race: on SQLite the migration's ``BEGIN IMMEDIATE`` holds the write lock, on PostgreSQL a
transaction-scoped advisory lock.
"""

from __future__ import annotations

from pathlib import Path

from alembic import command
from alembic.config import Config
from sqlalchemy import URL, Connection, func, select

from inferd.db.engine import UNAVAILABLE_ERRORS, create_engine
from inferd.errors import StoreUnavailable

__all__ = ["MIGRATIONS_DIR", "alembic_config", "foreign_keys_off", "migrate"]

MIGRATIONS_DIR = Path(__file__).resolve().parent / "migrations"
"""Alembic's script folder, installed with the package."""

# Any constant works, as long as every inferd process uses the same one ("inferd" in ASCII).
_ADVISORY_LOCK_KEY = 0x696E66657264


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic configuration of inferd's migrations, bound to ``connection`` if given."""
    config = Config()
    # The option goes through configparser interpolation: a '%' in the path must be doubled.
    config.set_main_option("script_location", str(MIGRATIONS_DIR).replace("%", "%%"))
    if connection is not None:
        config.attributes["connection"] = connection
    return config


def foreign_keys_off(connection: Connection) -> None:
    """Turn SQLite's foreign keys off on ``connection``'s DBAPI connection, outside any
    transaction (the engine's pool must hold that one connection for the migration)."""
    cursor = connection.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
    try:
        cursor.execute("PRAGMA foreign_keys=OFF")
    finally:
        cursor.close()


def _upgrade(connection: Connection) -> None:
    command.upgrade(alembic_config(connection), "head")


async def migrate(url: str | URL) -> None:
    """Upgrade the database at ``url`` to the newest schema; a no-op when it is up to date."""
    engine = create_engine(url, pool_size=1)
    try:
        if engine.dialect.name == "sqlite":
            async with engine.connect() as connection:
                await connection.run_sync(foreign_keys_off)
        async with engine.begin() as connection:
            if connection.dialect.name == "postgresql":
                await connection.execute(select(func.pg_advisory_xact_lock(_ADVISORY_LOCK_KEY)))
            await connection.run_sync(_upgrade)
    except UNAVAILABLE_ERRORS as exc:
        raise StoreUnavailable(f"cannot migrate the request store: {exc}") from exc
    finally:
        await engine.dispose()
