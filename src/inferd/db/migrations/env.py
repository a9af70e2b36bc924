"""Alembic environment of inferd's request store.

Two ways in:

* :func:`inferd.db.migrate.migrate` (what inferd runs) opens a connection itself and hands
  it over in ``config.attributes["connection"]``; this file only runs the migrations on it.
* The ``alembic`` command, given ``script_location`` and ``sqlalchemy.url`` (an async URL),
  e.g. to generate the SQL of a migration with ``--sql`` for a reviewing DBA.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from inferd.db.schema import VERSION_TABLE, metadata

config = context.config


def run_migrations_offline() -> None:
    """Write the SQL of the migrations instead of running them."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        literal_binds=True,
        dialect_opts={"paramstyle": "named"},
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations(connection: Connection) -> None:
    """Run the pending migrations on ``connection`` (in its transaction, if it has one)."""
    context.configure(
        connection=connection,
        target_metadata=metadata,
        version_table=VERSION_TABLE,
        # SQLite cannot ALTER most things: later migrations rebuild tables in batches.
        render_as_batch=connection.dialect.name == "sqlite",
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_from_url(url: str) -> None:
    """Open the store's engine on ``url`` and migrate (the ``alembic`` command's path)."""
    from inferd.db.engine import create_engine
    from inferd.db.migrate import foreign_keys_off

    engine = create_engine(url, pool_size=1)
    try:
        if engine.dialect.name == "sqlite":  # as inferd's own migrate(): see inferd.db.migrate
            async with engine.connect() as connection:
                await connection.run_sync(foreign_keys_off)
        async with engine.begin() as connection:
            await connection.run_sync(run_migrations)
    finally:
        await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    given = config.attributes.get("connection")
    if isinstance(given, Connection):
        run_migrations(given)
    else:
        url = config.get_main_option("sqlalchemy.url")
        if not url:
            raise RuntimeError("set sqlalchemy.url (an async URL) to run the migrations")
        asyncio.run(run_migrations_from_url(url))
