"""The SQLite store's writer thread: its WAL is checkpointed by a thread of its own."""

from __future__ import annotations

import asyncio
import shutil
import sqlite3
from pathlib import Path

import pytest

from inferd.db.engine import sqlite_url
from inferd.jobs import lite
from inferd.jobs.sql import SqlStore
from inferd.jobs.types import JobWrite

pytestmark = pytest.mark.integration


def _requests_in_main_file(path: Path, tmp: Path) -> int:
    """Requests in the database file itself, without its WAL: what a checkpoint copied."""
    alone = tmp / "alone.db"
    shutil.copyfile(path, alone)
    conn = sqlite3.connect(alone)
    try:
        return int(conn.execute("SELECT count(*) FROM inferd_requests").fetchone()[0])
    finally:
        conn.close()


async def test_the_wal_is_checkpointed_by_the_checkpointer_not_by_the_writer(
    tmp_path: Path, sqlite_template: Path
) -> None:
    path = tmp_path / "inferd.db"
    shutil.copyfile(sqlite_template, path)
    store = await SqlStore.connect(sqlite_url(path))
    try:
        for n in range(20):  # a few pages of WAL: far below SQLite's own threshold of 1,000
            await store.create(user="alice", model="echo", input={"n": n}, parameters={})
        await asyncio.sleep(lite.CHECKPOINT_SECONDS + 0.05)
        await store.create(user="alice", model="echo", input={"n": 20}, parameters={})
        for _ in range(100):  # the checkpoint asked for after that write
            if _requests_in_main_file(path, tmp_path) == 21:
                break
            await asyncio.sleep(0.02)
        assert _requests_in_main_file(path, tmp_path) == 21
        writer = store._lite
        assert writer is not None and writer._conn is not None
        autocheckpoint = await asyncio.get_running_loop().run_in_executor(
            writer._thread,
            lambda: writer._connection().execute("PRAGMA wal_autocheckpoint").fetchone()[0],
        )
        assert autocheckpoint == 0  # the writer's commits never checkpoint
    finally:
        await store.close()


async def test_a_streamed_chunk_takes_the_write_lock_before_the_writes_waiting(
    tmp_path: Path, sqlite_template: Path
) -> None:
    path = tmp_path / "inferd.db"
    shutil.copyfile(sqlite_template, path)
    store = await SqlStore.connect(sqlite_url(path))
    try:
        for n in range(2):
            await store.create(user="alice", model="echo", input={"n": n}, parameters={})
        lease = await store.claim("worker-1", 30)
        assert lease is not None
        lock = store._lock
        assert lock is not None
        order: list[str] = []
        await lock.acquire()  # a write in progress
        claim = asyncio.ensure_future(store.claim("worker-2", 30))
        claim.add_done_callback(lambda _: order.append("claim"))
        await asyncio.sleep(0.01)
        chunk = asyncio.ensure_future(store.write([JobWrite(lease, ({"response": 1},))]))
        chunk.add_done_callback(lambda _: order.append("chunk"))
        await asyncio.sleep(0.01)
        lock.release()
        await asyncio.gather(claim, chunk)
        assert order == ["chunk", "claim"]
        assert chunk.result()[0] is not None and claim.result() is not None
    finally:
        await store.close()
