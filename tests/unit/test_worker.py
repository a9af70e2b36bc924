"""The worker against the in-memory store: claim, run, store every chunk, settle fenced.

The models are real (scripted ones behind a real registry and batcher); the store is
:class:`tests.support.memory_store.MemoryStore`, whose clock the tests move to expire leases.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from inferd.jobs.events import InProcessEventBus
from inferd.jobs.runner import ModelExecutor
from inferd.jobs.types import Event, JobWrite, Lease, RequestStatus
from inferd.jobs.worker import Worker, _Writer
from inferd.logs import AccessLog
from tests.support.executor import STREAMER, TABULAR, executor_on
from tests.support.memory_store import MemoryStore
from tests.support.models import BATCHES

pytestmark = pytest.mark.unit


class RecordingBus(InProcessEventBus):
    """The in-process bus, remembering every publish."""

    def __init__(self) -> None:
        super().__init__()
        self.published: list[tuple[str, int]] = []
        self.carried: list[Event] = []  # the events published themselves

    async def publish(self, request_id: str, seq: int) -> None:
        self.published.append((request_id, seq))
        await super().publish(request_id, seq)

    async def publish_many(self, items: Sequence[tuple[str, int]]) -> None:
        self.published.extend(items)
        await super().publish_many(items)

    async def publish_events(self, events: Sequence[Event]) -> None:
        self.published.extend((event.request_id, event.seq) for event in events)
        self.carried.extend(events)
        await super().publish_events(events)


@pytest.fixture
async def executor(tmp_path: Path) -> AsyncIterator[ModelExecutor]:
    async with executor_on(tmp_path, state_dir=str(tmp_path)) as executor:
        yield executor


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
async def bus() -> AsyncIterator[RecordingBus]:
    bus = RecordingBus()
    yield bus
    await bus.close()


async def submit(store: MemoryStore, model: str, input: Any, **parameters: Any) -> str:
    record, created = await store.create(
        user="alice", model=model, input=input, parameters=parameters
    )
    assert created
    return record.id


async def until(predicate: Callable[[], bool], within: float = 5.0) -> None:
    """Wait for ``predicate`` to come true (checked every 5 ms)."""
    for _ in range(int(within / 0.005)):
        if predicate():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition did not come true in time")


def make_worker(
    store: MemoryStore, bus: RecordingBus, executor: ModelExecutor, **kw: Any
) -> Worker:
    options: dict[str, Any] = {"concurrency": 2, "heartbeat_seconds": 0.02, "poll_seconds": 0.02}
    return Worker(store, bus, executor, **(options | kw))


async def test_streaming_job_stores_every_chunk_then_done(
    store: MemoryStore, bus: RecordingBus, executor: ModelExecutor
) -> None:
    request_id = await submit(store, STREAMER, "hi", chunks=3)
    outcomes: list[tuple[str, str]] = []
    worker = make_worker(
        store, bus, executor, on_outcome=lambda model, outcome, _: outcomes.append((model, outcome))
    )

    assert await worker.run_burst() == 1

    record = store.records[request_id]
    assert record.status is RequestStatus.SUCCEEDED
    assert record.result == {"text": "hi-0hi-1hi-2", "model": STREAMER, "model_version": "1"}
    assert store.kinds(request_id) == [
        "status",
        "status",
        "response",
        "response",
        "response",
        "done",
    ]
    chunks = [e.data["response"] for e in store.log[request_id] if e.kind == "response"]
    assert chunks == ["hi-0", "hi-1", "hi-2"]
    # Followers are woken for each chunk and for the end, with the seq just stored.
    assert [seq for rid, seq in bus.published if rid == request_id] == [3, 4, 5, 6]
    # ... with the events themselves, as stored: followers need not read them back.
    assert [e for e in bus.carried if e.request_id == request_id] == store.log[request_id][2:]
    assert outcomes == [(STREAMER, "succeeded")]


async def test_job_lines_are_written_in_batches_as_json(
    store: MemoryStore, bus: RecordingBus, executor: ModelExecutor
) -> None:
    ids = [await submit(store, STREAMER, "hi", chunks=1) for _ in range(3)]
    out, quiet = io.BytesIO(), io.BytesIO()
    worker = make_worker(store, bus, executor, lines=AccessLog(out))
    assert await worker.run_burst() == 3
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert sorted(line["request_id"] for line in lines) == sorted(ids)
    for line in lines:
        assert line["event"] == "job finished"
        assert (line["logger"], line["level"]) == ("inferd.worker", "info")
        assert (line["model"], line["outcome"], line["chunks"]) == (STREAMER, "succeeded", 1)
        assert (line["attempt"], line["worker"]) == (1, worker.id)
        assert line["timestamp"].endswith("Z") and line["seconds"] >= 0

    # Below the info level there are none.
    await submit(store, STREAMER, "hi", chunks=1)
    worker = make_worker(store, bus, executor, lines=AccessLog(quiet, level="warning"))
    assert await worker.run_burst() == 1
    assert quiet.getvalue() == b""


async def test_job_lines_of_a_running_worker_are_written_within_a_moment(
    store: MemoryStore, bus: RecordingBus, executor: ModelExecutor
) -> None:
    out = io.BytesIO()
    worker = make_worker(store, bus, executor, lines=AccessLog(out))
    running = asyncio.create_task(worker.run())
    try:
        request_id = await submit(store, STREAMER, "hi", chunks=1)
        worker.wake()
        # One line, far from a batch's 64: the worker's timer writes it.
        await until(lambda: request_id.encode() in out.getvalue(), within=5.0)
    finally:
        await worker.stop()
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)


async def test_tabular_job_runs_in_the_versions_batcher(
    store: MemoryStore, bus: RecordingBus, executor: ModelExecutor
) -> None:
    BATCHES.pop(TABULAR, None)
    request_id = await submit(store, TABULAR, {"instances": [[1, 0, 0, 0], [2, 0, 0, 0]]})

    await make_worker(store, bus, executor).run_burst()

    record = store.records[request_id]
    assert record.status is RequestStatus.SUCCEEDED
    assert record.result["model"] == TABULAR
    assert [p["label"] for p in record.result["predictions"]] == ["one", "two"]
    assert BATCHES[TABULAR] == [[1.0, 2.0]]  # one batch of the model, through the batcher


async def test_failure_is_retried_then_dead_with_the_last_error(
    store: MemoryStore, bus: RecordingBus, executor: ModelExecutor
) -> None:
    request_id = await submit(store, STREAMER, "boom")
    terminal: list[Event] = []

    async def on_terminal(lease: Lease, event: Event, chunks: list[Any]) -> None:
        terminal.append(event)

    await make_worker(store, bus, executor, on_terminal=on_terminal).run_burst()

    record = store.records[request_id]
    assert record.status is RequestStatus.DEAD
    assert record.attempts == 3
    assert "the model exploded" in (record.error or "")
    requeued = [e for e in store.log[request_id] if e.data.get("reason")]
    assert len(requeued) == 2  # two retries, then the end
    assert [e.kind for e in terminal] == ["error"]


async def test_flaky_job_succeeds_on_a_later_attempt(
    store: MemoryStore, bus: RecordingBus, executor: ModelExecutor
) -> None:
    request_id = await submit(store, STREAMER, "flaky:1", chunks=1)

    await make_worker(store, bus, executor).run_burst()

    record = await store.get(request_id)
    assert record is not None
    assert record.status is RequestStatus.SUCCEEDED
    assert record.attempts == 2
    assert record.responses == [
        {"response": "flaky:1-0", "sent_at": record.responses[0]["sent_at"]}
    ]


async def test_bad_input_fails_without_retry(
    store: MemoryStore, bus: RecordingBus, executor: ModelExecutor
) -> None:
    # Stored without the API's validation: the worker's run finds it (a 422, not retryable).
    request_id = await submit(store, TABULAR, {"features": [1, 2]})

    await make_worker(store, bus, executor).run_burst()

    record = store.records[request_id]
    assert record.status is RequestStatus.FAILED
    assert record.attempts == 1


async def test_cancel_while_running_stops_between_chunks(
    tmp_path: Path, store: MemoryStore, bus: RecordingBus
) -> None:
    async with executor_on(tmp_path, chunk_delay_s=0.05) as executor:
        request_id = await submit(store, STREAMER, "long", chunks=200)
        worker = make_worker(store, bus, executor)
        runner = asyncio.create_task(worker.run_burst())
        await until(lambda: any(e.kind == "response" for e in store.log[request_id]))
        await store.cancel(request_id, "alice")
        async with asyncio.timeout(5):
            await runner

    record = await store.get(request_id)
    assert record is not None
    assert record.status is RequestStatus.CANCELLED
    assert 1 <= len(record.responses) < 200
    assert store.kinds(request_id)[-1] == "error"


class CountingStore(MemoryStore):
    """The in-memory store, counting heartbeats per request."""

    def __init__(self) -> None:
        super().__init__()
        self.beats: dict[str, int] = {}

    async def heartbeat(self, lease: Lease, lease_seconds: float) -> bool:
        self.beats[lease.request_id] = self.beats.get(lease.request_id, 0) + 1
        return await super().heartbeat(lease, lease_seconds)


async def test_only_jobs_longer_than_a_heartbeat_period_send_heartbeats(
    tmp_path: Path, bus: RecordingBus
) -> None:
    store = CountingStore()
    async with executor_on(tmp_path, chunk_delay_s=0.05) as executor:
        short = [await submit(store, STREAMER, "s", chunks=1) for _ in range(3)]
        long = await submit(store, STREAMER, "l", chunks=20)  # ~1 s
        worker = make_worker(store, bus, executor, heartbeat_seconds=0.3, concurrency=4)
        running = asyncio.create_task(worker.run_burst())
        seen: set[str] = set()  # the names of the tasks that ran meanwhile
        while not running.done():
            seen |= {task.get_name() for task in asyncio.all_tasks()}
            await asyncio.sleep(0.002)
        assert await running == 4
    assert store.records[long].status is RequestStatus.SUCCEEDED
    assert 2 <= store.beats.get(long, 0) <= 5  # every 0.3 s of its ~1 s
    assert not any(store.beats.get(request_id) for request_id in short)
    # One task for the heartbeats of all jobs, and one per heartbeat sent: none per job.
    assert not seen & {f"heartbeat:{request_id}" for request_id in short}
    assert "worker-heartbeats" in seen
    assert not [task for task in asyncio.all_tasks() if "heartbeat" in task.get_name()]


async def test_a_worker_that_lost_its_lease_writes_nothing(
    tmp_path: Path, store: MemoryStore, bus: RecordingBus
) -> None:
    async with executor_on(tmp_path, chunk_delay_s=0.05) as executor:
        request_id = await submit(store, STREAMER, "slow", chunks=100)
        # Heartbeats too rare to keep the lease: the clock moves past it, another takes it.
        first = make_worker(store, bus, executor, lease_seconds=1.0, heartbeat_seconds=30.0)
        running = asyncio.create_task(first.run_burst())
        await until(lambda: any(e.kind == "response" for e in store.log[request_id]))
        store.advance(2.0)
        thief = await store.claim("thief", 60.0)
        assert thief is not None and thief.request_id == request_id and thief.attempt == 2
        async with asyncio.timeout(5):
            await running  # its next chunk is refused: it stops and settles nothing

    after = store.log[request_id]
    # Nothing of attempt 1 after the thief's claim; the request is the thief's to finish.
    taken = next(
        i for i, e in enumerate(after) if e.data.get("status") == "running" and e.attempt == 2
    )
    assert after[taken - 1].data["reason"] == "lease expired"
    assert all(e.attempt == 2 for e in after[taken:])
    assert store.records[request_id].status is RequestStatus.RUNNING
    assert await store.complete(thief, {"text": "ok"}) is not None


async def test_stop_hands_running_jobs_back_without_burning_an_attempt(
    tmp_path: Path, store: MemoryStore, bus: RecordingBus
) -> None:
    async with executor_on(tmp_path, chunk_delay_s=0.05) as executor:
        request_id = await submit(store, STREAMER, "long", chunks=200)
        worker = make_worker(store, bus, executor)
        running = asyncio.create_task(worker.run())
        await until(lambda: store.records[request_id].status is RequestStatus.RUNNING)
        await worker.stop(grace=0.1)
        async with asyncio.timeout(5):
            await running

    record = store.records[request_id]
    assert record.status is RequestStatus.QUEUED
    assert record.attempts == 0  # given back: the next worker's run is attempt 1 again
    assert store.log[request_id][-1].data["reason"] == "worker shut down"


async def test_a_failing_claim_does_not_kill_the_worker(
    store: MemoryStore, bus: RecordingBus, executor: ModelExecutor
) -> None:
    request_id = await submit(store, STREAMER, "x", chunks=1)
    real_claim = store.claim
    failures = 2

    async def claim(worker_id: str, lease_seconds: float, models: list[str] | None = None) -> Any:
        nonlocal failures
        if failures:
            failures -= 1
            raise ConnectionError("database went away")
        return await real_claim(worker_id, lease_seconds, models)

    store.claim = claim  # type: ignore[method-assign]
    worker = make_worker(store, bus, executor)
    running = asyncio.create_task(worker.run())
    await until(lambda: store.records[request_id].status is RequestStatus.SUCCEEDED)
    await worker.stop(grace=1.0)
    await running
    assert failures == 0


async def test_only_the_models_it_serves(
    store: MemoryStore, bus: RecordingBus, executor: ModelExecutor
) -> None:
    tabular = await submit(store, TABULAR, {"features": [0, 0, 0, 0]})
    streamed = await submit(store, STREAMER, "s", chunks=1)

    assert await make_worker(store, bus, executor, models=[STREAMER]).run_burst() == 1

    assert store.records[streamed].status is RequestStatus.SUCCEEDED
    assert store.records[tabular].status is RequestStatus.QUEUED


async def test_concurrency_bounds_the_jobs_held_at_once(
    tmp_path: Path, store: MemoryStore, bus: RecordingBus
) -> None:
    async with executor_on(tmp_path, chunk_delay_s=0.02) as executor:
        ids = [await submit(store, STREAMER, f"j{i}", chunks=3) for i in range(5)]
        worker = make_worker(store, bus, executor, concurrency=2)
        most = 0
        burst = asyncio.create_task(worker.run_burst())
        while not burst.done():
            running = sum(store.records[i].status is RequestStatus.RUNNING for i in ids)
            most = max(most, running)
            await asyncio.sleep(0.005)
        assert await burst == 5
    assert most <= 2
    assert all(store.records[i].status is RequestStatus.SUCCEEDED for i in ids)


def test_concurrency_must_be_positive(store: MemoryStore) -> None:
    with pytest.raises(ValueError, match="concurrency"):
        Worker(store, InProcessEventBus(), None, concurrency=0)  # type: ignore[arg-type]


class _HeldWrites:
    """A queue whose ``write`` blocks until released, one release per batch, in order."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release: list[asyncio.Event] = []

    async def write(self, writes: Sequence[JobWrite]) -> list[list[Event] | None]:
        self.batches.append([w.lease.request_id for w in writes])
        gate = asyncio.Event()
        self.release.append(gate)
        await gate.wait()
        return [[] for _ in writes]


def _lease(request_id: str) -> Lease:
    return Lease(request_id, "token", 1, datetime.now(UTC), "m", None, {})


@pytest.mark.parametrize("lanes", [1, 2])
async def test_a_write_waits_for_a_batch_in_flight_only_without_a_second_lane(
    lanes: int, bus: RecordingBus
) -> None:
    queue = _HeldWrites()
    writer = _Writer(queue, bus, max_batch=64, lanes=lanes)  # type: ignore[arg-type]
    try:
        first = asyncio.ensure_future(writer.write(JobWrite(_lease("a"))))
        await asyncio.sleep(0.01)
        second = asyncio.ensure_future(writer.write(JobWrite(_lease("b"))))
        await asyncio.sleep(0.01)
        if lanes == 1:  # b waits for a's transaction to end before its own begins
            assert queue.batches == [["a"]]
            queue.release[0].set()
            await first
            await asyncio.sleep(0.01)
        assert queue.batches == [["a"], ["b"]]
        queue.release[-1].set()
        await second
        queue.release[0].set()
        await first
    finally:
        await writer.close()


async def test_chunks_never_wait_behind_completions_and_go_first(bus: RecordingBus) -> None:
    """Two lanes: batches of completions hold one at most, so a streamed chunk finds the
    other free; a chunk pending when a lane frees is stored before completions, alone."""
    queue = _HeldWrites()
    writer = _Writer(queue, bus, max_batch=64, lanes=2)  # type: ignore[arg-type]
    try:
        done_a = asyncio.ensure_future(writer.write(JobWrite(_lease("a"), done=True)))
        await asyncio.sleep(0.01)
        done_b = asyncio.ensure_future(writer.write(JobWrite(_lease("b"), done=True)))
        await asyncio.sleep(0.01)
        assert queue.batches == [["a"]]  # b waits: the second lane stays for chunks
        chunk_c = asyncio.ensure_future(writer.write(JobWrite(_lease("c"), ({"response": 1},))))
        await asyncio.sleep(0.01)
        assert queue.batches == [["a"], ["c"]]  # at once, without b
        chunk_d = asyncio.ensure_future(writer.write(JobWrite(_lease("d"), ({"response": 2},))))
        await asyncio.sleep(0.01)
        queue.release[0].set()  # a's lane frees: d, pending, goes before b
        await done_a
        await asyncio.sleep(0.01)
        assert queue.batches == [["a"], ["c"], ["d"]]
        queue.release[1].set()
        queue.release[2].set()
        await chunk_c
        await chunk_d
        await asyncio.sleep(0.01)
        assert queue.batches == [["a"], ["c"], ["d"], ["b"]]
        queue.release[3].set()
        await done_b
    finally:
        await writer.close()


async def test_a_chunk_that_finds_a_lane_free_is_stored_by_its_own_task(
    bus: RecordingBus,
) -> None:
    ran_in: list[asyncio.Task[Any] | None] = []

    class Queue:
        async def write(self, writes: Sequence[JobWrite]) -> list[list[Event] | None]:
            ran_in.append(asyncio.current_task())
            return [[] for _ in writes]

    writer = _Writer(Queue(), bus, max_batch=64, lanes=2)  # type: ignore[arg-type]
    try:
        assert await writer.write(JobWrite(_lease("c"), ({"response": 1},))) == []
        assert ran_in == [asyncio.current_task()]
        assert await writer.write(JobWrite(_lease("d"), done=True)) == []  # a completion
        assert len(ran_in) == 2 and ran_in[1] is not asyncio.current_task()  # a batch's task
    finally:
        await writer.close()


async def test_a_store_lets_a_worker_write_in_two_lanes(tmp_path: Path) -> None:
    from inferd.db.engine import sqlite_url
    from inferd.jobs.sql import SqlStore

    # On SQLite the second lane's chunks take the one writer's lock before other writes.
    assert SqlStore(sqlite_url(tmp_path / "q.db")).write_lanes == 2
    assert SqlStore("postgresql+asyncpg://nobody@127.0.0.1:1/none").write_lanes == 2
