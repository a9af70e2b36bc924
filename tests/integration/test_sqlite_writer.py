"""The SQLite store's writer thread: its WAL is checkpointed by a thread of its own."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

from inferd.db.engine import sqlite_url
from inferd.errors import StoreUnavailable
from inferd.jobs import lite
from inferd.jobs.sql import SqlStore
from inferd.jobs.types import JobWrite, RequestStatus

pytestmark = pytest.mark.integration

MakeStore = Callable[..., Awaitable[SqlStore]]


@pytest.fixture
def path(tmp_path: Path, sqlite_template: Path) -> Path:
    """A migrated, empty SQLite file."""
    path = tmp_path / "inferd.db"
    shutil.copyfile(sqlite_template, path)
    return path


@pytest.fixture
async def make_store(path: Path) -> AsyncIterator[MakeStore]:
    """``await make_store(**options)``: a store on that file, closed at the end."""
    made: list[SqlStore] = []

    async def make(**options: Any) -> SqlStore:
        made.append(await SqlStore.connect(sqlite_url(path), **options))
        return made[-1]

    try:
        yield make
    finally:
        for store in made:
            await store.close()


def _requests_in_main_file(path: Path) -> int:
    """Requests in the database file itself, without its WAL: what a checkpoint copied."""
    alone = path.with_name("alone.db")
    shutil.copyfile(path, alone)
    conn = sqlite3.connect(alone)
    try:
        return int(conn.execute("SELECT count(*) FROM inferd_requests").fetchone()[0])
    finally:
        conn.close()


async def test_the_wal_is_checkpointed_by_the_checkpointer_not_by_the_writer(
    path: Path, make_store: MakeStore
) -> None:
    store = await make_store()
    for n in range(20):  # a few pages of WAL: far below SQLite's own threshold of 1,000
        await store.create(user="alice", model="echo", input={"n": n}, parameters={})
    await asyncio.sleep(lite.CHECKPOINT_SECONDS + 0.05)
    await store.create(user="alice", model="echo", input={"n": 20}, parameters={})
    for _ in range(100):  # the checkpoint asked for after that write
        if _requests_in_main_file(path) == 21:
            break
        await asyncio.sleep(0.02)
    assert _requests_in_main_file(path) == 21
    writer = store._lite
    assert writer is not None and writer._conn is not None
    autocheckpoint = await writer._call(
        lambda: writer._connection().execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    )
    assert autocheckpoint == 0  # the writer's commits never checkpoint


async def test_a_streamed_chunk_then_a_submit_go_before_the_writes_waiting(
    make_store: MakeStore,
) -> None:
    store = await make_store()
    for n in range(3):
        await store.create(user="alice", model="echo", input={"n": n}, parameters={})
    lease = await store.claim("worker-1", 30)
    assert lease is not None
    writer = store._lite
    assert writer is not None
    order: list[str] = []  # as the writer's thread runs them
    for name in ("_claim", "_create", "_write"):
        run = getattr(writer, name)

        def noted(*args: Any, _run: Any = run, _name: str = name) -> Any:
            order.append(_name)
            return _run(*args)

        setattr(writer, name, noted)

    def started(name: str) -> asyncio.Future[Any]:
        call: Awaitable[Any]
        if name.startswith("claim"):
            call = store.claim(name, 30)
        elif name == "submit":
            call = store.create(user="bob", model="echo", input={}, parameters={})
        else:
            call = store.write([JobWrite(lease, ({"response": name},))])
        return asyncio.ensure_future(call)

    async with writer.exclusive():  # the writer's thread busy: the calls wait
        calls = [started("claim-1"), started("submit"), started("chunk"), started("claim-2")]
        await asyncio.sleep(0.05)
        assert order == []
    await asyncio.gather(*calls)
    # A follower waits for the chunk, a client for the submit's answer: then the rest.
    assert order == ["_write", "_create", "_claim", "_claim"]
    assert all(call.result() is not None for call in calls)


async def test_a_write_of_the_general_path_waits_for_the_writer_thread_not_sqlite(
    make_store: MakeStore,
) -> None:
    """A cancel (a transaction through SQLAlchemy's connection) asked for while the writer
    thread is in a long transaction runs after it, rather than failing in SQLite's busy
    timeout (here 50 ms) for the lock that transaction holds."""
    store = await make_store(busy_timeout=0.05)
    record, _ = await store.create(user="alice", model="echo", input={}, parameters={})
    writer = store._lite
    assert writer is not None

    def long_transaction() -> None:
        conn = writer._connection()
        conn.execute("BEGIN IMMEDIATE")
        time.sleep(0.3)
        conn.execute("COMMIT")

    held = asyncio.ensure_future(writer._call(long_transaction))
    await asyncio.sleep(0.05)  # it holds SQLite's write lock
    cancelled = await store.cancel(record.id, "alice")
    assert cancelled is not None and cancelled.status is RequestStatus.CANCELLED
    assert held.done()


async def test_calls_after_close_are_refused_and_close_ends_the_thread(
    make_store: MakeStore,
) -> None:
    store = await make_store()
    await store.create(user="alice", model="echo", input={}, parameters={})
    writer = store._lite
    assert writer is not None and writer._thread is not None
    thread = writer._thread
    await store.close()
    assert not thread.is_alive()
    with pytest.raises(StoreUnavailable):
        await writer.write([], time.time)
