"""The SQLite store's write lock: a streamed chunk's write goes before the writes waiting."""

from __future__ import annotations

import asyncio

import pytest

from inferd.jobs.lite import WriteLock

pytestmark = pytest.mark.unit


async def _take(lock: WriteLock, name: str, order: list[str], *, urgent: bool = False) -> None:
    if urgent:
        async with lock.urgent():
            order.append(name)
            await asyncio.sleep(0)
    else:
        async with lock:
            order.append(name)
            await asyncio.sleep(0)


async def test_urgent_waiters_go_first_and_each_kind_in_turn() -> None:
    lock = WriteLock()
    order: list[str] = []
    await lock.acquire()
    tasks = [
        asyncio.ensure_future(_take(lock, "claim", order)),
        asyncio.ensure_future(_take(lock, "submits", order)),
        asyncio.ensure_future(_take(lock, "chunk-1", order, urgent=True)),
        asyncio.ensure_future(_take(lock, "chunk-2", order, urgent=True)),
    ]
    await asyncio.sleep(0.01)
    assert order == []  # all wait for the holder
    lock.release()
    await asyncio.gather(*tasks)
    assert order == ["chunk-1", "chunk-2", "claim", "submits"]
    assert not lock.locked()


async def test_a_free_lock_is_taken_at_once_and_released_by_its_holder_only() -> None:
    lock = WriteLock()
    async with lock.urgent():
        assert lock.locked()
    assert not lock.locked()
    with pytest.raises(RuntimeError):
        lock.release()


async def test_a_waiter_cancelled_while_waiting_leaves_the_queue() -> None:
    lock = WriteLock()
    order: list[str] = []
    await lock.acquire()
    gone = asyncio.ensure_future(_take(lock, "gone", order, urgent=True))
    stays = asyncio.ensure_future(_take(lock, "stays", order))
    await asyncio.sleep(0.01)
    gone.cancel()
    await asyncio.sleep(0.01)
    lock.release()
    await stays
    assert order == ["stays"]
    assert gone.cancelled()
    assert not lock.locked()


async def test_a_waiter_cancelled_once_handed_the_lock_passes_it_on() -> None:
    lock = WriteLock()
    order: list[str] = []
    await lock.acquire()
    handed = asyncio.ensure_future(lock.acquire(urgent=True))
    after = asyncio.ensure_future(_take(lock, "after", order))
    await asyncio.sleep(0.01)
    lock.release()  # hands it to `handed`, which is cancelled before it resumes
    handed.cancel()
    await asyncio.wait_for(after, 1)
    assert order == ["after"]
    assert not lock.locked()
