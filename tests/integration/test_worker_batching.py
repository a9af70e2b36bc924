"""The worker's throughput paths on a real SQLite store and real models: jobs claimed several
at a time, their writes group-committed, and idle workers woken by the API's announcement."""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from inferd.db.engine import sqlite_url
from inferd.jobs.events import InProcessEventBus
from inferd.jobs.runner import ModelExecutor
from inferd.jobs.service import RequestService
from inferd.jobs.sql import SqlStore
from inferd.jobs.types import RequestStatus
from inferd.jobs.worker import Worker
from inferd.metrics import Metrics
from inferd.models.registry import ModelRegistry
from inferd.settings import Settings

IRIS = {"features": [5.1, 3.5, 1.4, 0.2]}


@pytest.fixture
async def parts(
    tmp_path: Path, models_dir: Path, sqlite_template: Path
) -> AsyncIterator[tuple[SqlStore, InProcessEventBus, ModelExecutor]]:
    path = tmp_path / "inferd.db"
    shutil.copyfile(sqlite_template, path)
    settings = Settings(_env_file=None, models_dir=models_dir, models=["iris"], gc_freeze=False)
    registry = ModelRegistry(settings, Metrics())
    await registry.load_all()
    store = SqlStore(sqlite_url(path))
    bus = InProcessEventBus()
    try:
        yield store, bus, ModelExecutor(registry)
    finally:
        await registry.stop()
        await bus.close()
        await store.close()


async def _run(worker: Worker) -> asyncio.Task[None]:
    task = asyncio.get_running_loop().create_task(worker.run())
    for _ in range(500):  # until the worker's claim found nothing and it waits for news
        if worker._idle.is_set():
            return task
        await asyncio.sleep(0.01)
    raise AssertionError("the worker never waited for announcements")


async def _wait_done(store: SqlStore, ids: list[str], within: float) -> list[Any]:
    async with asyncio.timeout(within):
        while True:
            records = [await store.get(request_id) for request_id in ids]
            if all(record is not None and record.terminal for record in records):
                return records
            await asyncio.sleep(0.02)


async def test_an_idle_worker_is_woken_by_a_submit_not_by_its_poll(
    parts: tuple[SqlStore, InProcessEventBus, ModelExecutor],
) -> None:
    store, bus, executor = parts
    worker = Worker(store, bus, executor, poll_seconds=60.0)
    task = await _run(worker)
    await asyncio.sleep(0.2)  # the worker's first claim found nothing: it waits now
    service = RequestService(store, bus, executor)  # no on_submit: only the bus can tell
    record, _ = await service.submit("alice", {"model": "iris", "input": IRIS})
    try:
        (done,) = await _wait_done(store, [record.id], within=10.0)  # far below the poll
    finally:
        await worker.stop(grace=1)
        await task
    assert done.status is RequestStatus.SUCCEEDED
    assert done.result["predictions"]


async def test_a_submit_wakes_one_of_several_idle_workers(
    parts: tuple[SqlStore, InProcessEventBus, ModelExecutor],
) -> None:
    # Each claim is a write transaction; on a broadcast, every idle worker would claim and
    # all but one would find nothing.
    store, bus, executor = parts
    claims = 0
    claim_many = store.claim_many

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal claims
        claims += 1
        return await claim_many(*args, **kwargs)

    workers = [Worker(store, bus, executor, concurrency=4, poll_seconds=60.0) for _ in range(4)]
    tasks = [await _run(worker) for worker in workers]  # each claimed once, found nothing
    store.claim_many = counted  # type: ignore[method-assign]
    service = RequestService(store, bus, executor)
    record, _ = await service.submit("alice", {"model": "iris", "input": IRIS})
    try:
        (done,) = await _wait_done(store, [record.id], within=10.0)
        await asyncio.sleep(0.1)  # time for any other woken worker to claim
    finally:
        for worker in workers:
            await worker.stop(grace=1)
        await asyncio.gather(*tasks)
    assert done.status is RequestStatus.SUCCEEDED
    assert claims == 1


async def test_after_a_short_claim_the_next_one_waits_for_the_claim_interval(
    parts: tuple[SqlStore, InProcessEventBus, ModelExecutor],
) -> None:
    # Requests arriving one by one are then taken together, in one claim transaction.
    store, bus, executor = parts
    claims: list[float] = []
    claim_many = store.claim_many

    async def timed(*args: Any, **kwargs: Any) -> Any:
        claims.append(asyncio.get_running_loop().time())
        return await claim_many(*args, **kwargs)

    store.claim_many = timed  # type: ignore[method-assign]
    worker = Worker(store, bus, executor, concurrency=8, poll_seconds=60.0, claim_interval=0.5)
    task = await _run(worker)  # its first claim found nothing
    service = RequestService(store, bus, executor)
    try:
        first, _ = await service.submit("alice", {"model": "iris", "input": IRIS})
        await _wait_done(store, [first.id], within=5.0)  # claimed at once: the queue was idle
        ids = [
            (await service.submit("alice", {"model": "iris", "input": IRIS}))[0].id
            for _ in range(3)
        ]
        await _wait_done(store, ids, within=5.0)
    finally:
        await worker.stop(grace=1)
        await task
    assert len(claims) == 3  # the idle one, the first request's, then the three together
    assert claims[2] - claims[1] >= 0.5


async def test_a_worker_stopped_between_claims_claims_no_more(
    parts: tuple[SqlStore, InProcessEventBus, ModelExecutor],
) -> None:
    store, bus, executor = parts
    worker = Worker(store, bus, executor, concurrency=8, poll_seconds=60.0, claim_interval=0.5)
    task = await _run(worker)
    service = RequestService(store, bus, executor)
    first, _ = await service.submit("alice", {"model": "iris", "input": IRIS})
    await _wait_done(store, [first.id], within=5.0)
    second, _ = await service.submit("alice", {"model": "iris", "input": IRIS})
    await asyncio.sleep(0.1)  # the worker waits out its claim interval
    await worker.stop(grace=1)
    await task
    record = await store.get(second.id)
    assert record is not None and record.status is RequestStatus.QUEUED


async def test_concurrent_jobs_share_claims_and_write_transactions(
    parts: tuple[SqlStore, InProcessEventBus, ModelExecutor],
) -> None:
    store, bus, executor = parts
    ids = [
        (await store.create(user="bob", model="iris", input=IRIS, parameters={}))[0].id
        for _ in range(48)
    ]
    claims = 0
    claim_many = store.claim_many

    async def counted(*args: Any, **kwargs: Any) -> Any:
        nonlocal claims
        leases = await claim_many(*args, **kwargs)
        claims += bool(leases)
        return leases

    store.claim_many = counted  # type: ignore[method-assign]
    worker = Worker(store, bus, executor, concurrency=16)
    assert await worker.run_burst() == 48
    records = await _wait_done(store, ids, within=5.0)
    assert {record.status for record in records} == {RequestStatus.SUCCEEDED}
    for record in records:
        assert record.attempts == 1 and record.last_seq == 4  # queued, running, chunk, done
        assert [r["response"] for r in record.responses] == [record.result]
        assert [e.seq for e in await store.events(record.id)] == [1, 2, 3, 4]
    assert claims < 48  # several jobs per claim
    assert worker._writer.writes == 48
    assert worker._writer.batches < 48  # several jobs per write transaction
