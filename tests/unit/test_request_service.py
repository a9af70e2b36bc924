"""The request service against the in-memory store: what the HTTP routes of long-running
requests call (submit, read, list, cancel, follow)."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from inferd.errors import IdempotencyConflict, ModelNotFound, NotFound, ValidationFailed
from inferd.jobs.events import InProcessEventBus
from inferd.jobs.service import ANNOUNCE_SPACING, RequestService
from inferd.jobs.types import Event, EventKind, RequestStatus
from tests.support.executor import STREAMER, TABULAR, executor_on
from tests.support.memory_store import MemoryStore

pytestmark = pytest.mark.unit


@pytest.fixture
def store() -> MemoryStore:
    return MemoryStore()


@pytest.fixture
async def service(tmp_path: Path, store: MemoryStore) -> AsyncIterator[RequestService]:
    bus = InProcessEventBus()
    async with executor_on(tmp_path) as executor:
        yield RequestService(store, bus, executor, max_attempts=4, keepalive=0.05)
    await bus.close()


@pytest.mark.parametrize(
    ("body", "complaint"),
    [
        ([1, 2], "must be a JSON object"),
        ({"model": STREAMER, "input": "x", "colour": 1}, "unknown field.*'colour'"),
        ({"input": "x"}, "'model' must be the name"),
        ({"model": "", "input": "x"}, "'model' must be the name"),
        ({"model": STREAMER}, "missing field 'input'"),
        ({"model": STREAMER, "input": "x", "parameters": [1]}, "'parameters' must be an object"),
        ({"model": TABULAR, "input": {"features": [1]}}, "4"),
        ({"model": STREAMER, "input": 5}, "input must be a string"),
    ],
)
async def test_bad_submits_are_refused_and_store_nothing(
    service: RequestService, store: MemoryStore, body: Any, complaint: str
) -> None:
    with pytest.raises(ValidationFailed, match=complaint):
        await service.submit("alice", body)
    assert store.records == {}


async def test_only_a_models_own_check_runs_off_the_event_loop(
    service: RequestService, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A thread hop costs more than parsing a few rows; a model's own check may tokenize.
    import inferd.jobs.service

    hops: list[Any] = []
    run_blocking = inferd.jobs.service.run_blocking

    async def counted(fn: Any, *args: Any) -> Any:
        hops.append(fn)
        return await run_blocking(fn, *args)

    monkeypatch.setattr(inferd.jobs.service, "run_blocking", counted)
    await service.submit("alice", {"model": TABULAR, "input": {"features": [1, 2, 3, 4]}})
    assert hops == []
    await service.submit("alice", {"model": STREAMER, "input": "x"})
    assert len(hops) == 1


async def test_unknown_model_is_a_404(service: RequestService, store: MemoryStore) -> None:
    with pytest.raises(ModelNotFound):
        await service.submit("alice", {"model": "nope", "input": "x"})
    assert store.records == {}


async def test_idempotency_key_length_is_checked(service: RequestService) -> None:
    body = {"model": STREAMER, "input": "x"}
    with pytest.raises(ValidationFailed, match="Idempotency-Key"):
        await service.submit("alice", body, idempotency_key="")
    with pytest.raises(ValidationFailed, match="Idempotency-Key"):
        await service.submit("alice", body, idempotency_key="k" * 256)


async def test_submit_stores_queued_with_the_serving_version(
    tmp_path: Path, store: MemoryStore
) -> None:
    submitted: list[int] = []
    async with executor_on(tmp_path) as executor:
        service = RequestService(
            store,
            InProcessEventBus(),
            executor,
            max_attempts=4,
            on_submit=lambda: submitted.append(1),
        )
        record, created = await service.submit(
            "alice", {"model": STREAMER, "input": "x", "parameters": {"chunks": 2}}
        )
    assert created and submitted == [1]
    assert record.status is RequestStatus.QUEUED
    assert (record.model, record.version, record.max_attempts) == (STREAMER, "1", 4)
    assert record.parameters == {"chunks": 2}
    assert store.kinds(record.id) == ["status"]


class CountingBus(InProcessEventBus):
    """An in-process bus that notes when each announcement was made."""

    def __init__(self) -> None:
        super().__init__()
        self.announced: list[float] = []

    async def announce(self) -> None:
        self.announced.append(asyncio.get_running_loop().time())
        await asyncio.sleep(0.0005)  # a round trip to Redis
        await super().announce()


async def test_announcements_are_coalesced_and_spaced_and_the_last_submit_is_announced(
    tmp_path: Path, store: MemoryStore
) -> None:
    bus = CountingBus()
    body = {"model": STREAMER, "input": "x"}
    async with executor_on(tmp_path) as executor:
        service = RequestService(store, bus, executor)
        await service.submit("alice", body)  # a lone submit: announced at once
        await asyncio.sleep(0.01)
        assert len(bus.announced) == 1
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(20):  # a steady flow, five submits every ~0.5 ms
            last_started = loop.time()
            await asyncio.gather(*(service.submit("alice", body) for _ in range(5)))
            await asyncio.sleep(0.0005)
        await asyncio.sleep(0.05)
    flow = [at for at in bus.announced if at >= started]
    gaps = [b - a for a, b in itertools.pairwise(flow)]
    assert len(flow) >= 2 and min(gaps) >= ANNOUNCE_SPACING
    assert flow[-1] >= last_started  # the submits of the end were announced too
    await bus.close()


async def test_idempotent_replay_returns_the_same_request(
    service: RequestService, store: MemoryStore
) -> None:
    body = {"model": STREAMER, "input": "x"}
    first, created = await service.submit("alice", body, idempotency_key="k1")
    again, created_again = await service.submit("alice", body, idempotency_key="k1")
    assert created and not created_again
    assert again.id == first.id and len(store.records) == 1
    # Another user's key is another namespace; another body under the same key is a 409.
    other, other_created = await service.submit("bob", body, idempotency_key="k1")
    assert other_created and other.id != first.id
    with pytest.raises(IdempotencyConflict):
        await service.submit("alice", {"model": STREAMER, "input": "y"}, idempotency_key="k1")


async def test_a_user_sees_only_their_requests(service: RequestService) -> None:
    mine, _ = await service.submit("alice", {"model": STREAMER, "input": "x"})
    assert (await service.get("alice", mine.id)).id == mine.id
    with pytest.raises(NotFound):
        await service.get("bob", mine.id)
    with pytest.raises(NotFound):
        await service.cancel("bob", mine.id)
    with pytest.raises(NotFound):
        await service.follow("bob", mine.id, 0)
    assert [r.id for r in (await service.page("bob", None, 10)).items] == []
    assert [r.id for r in (await service.page("alice", None, 10)).items] == [mine.id]


async def test_cancel_of_a_queued_request_ends_it_and_wakes_followers(
    service: RequestService, store: MemoryStore
) -> None:
    record, _ = await service.submit("alice", {"model": STREAMER, "input": "x"})
    woken: list[int] = []

    async def listen() -> None:
        async for seq in service.bus.subscribe(record.id):
            woken.append(seq)
            return

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0)
    cancelled = await service.cancel("alice", record.id)
    await asyncio.wait_for(listener, 2)

    assert cancelled.status is RequestStatus.CANCELLED
    assert woken == [cancelled.last_seq] == [2]
    assert store.kinds(record.id) == ["status", "error"]


async def test_follow_replays_then_ends_at_the_terminal_event(
    service: RequestService, store: MemoryStore
) -> None:
    record, _ = await service.submit("alice", {"model": STREAMER, "input": "x"})
    lease = await store.claim("w", 30.0)
    assert lease is not None
    await store.append(lease, {"response": "x-0"})
    await store.complete(lease, {"text": "x-0"})

    events: list[Event | None] = []
    async for event in await service.follow("alice", record.id, 0):
        events.append(event)
    got = [(e.seq, e.kind) for e in events if e is not None]
    assert got == [
        (1, EventKind.STATUS),
        (2, EventKind.STATUS),
        (3, EventKind.RESPONSE),
        (4, EventKind.DONE),
    ]
    resumed = [e async for e in await service.follow("alice", record.id, 3) if e is not None]
    assert [e.seq for e in resumed] == [4]
