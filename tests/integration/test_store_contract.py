"""The contract of the SQL request store and job queue, run against SQLite and PostgreSQL.

Time is an injected clock moved by the tests: leases expire and retries come due without
sleeping.
"""

from __future__ import annotations

import asyncio
import shutil
import socket
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection, column, event, select, table, text

from inferd.db.engine import sqlite_url
from inferd.db.migrate import migrate
from inferd.db.schema import VERSION_TABLE, metadata
from inferd.errors import (
    BadRequest,
    IdempotencyConflict,
    InvalidState,
    QueueFull,
    StoreUnavailable,
    TooManyQueued,
)
from inferd.jobs.events import InProcessEventBus
from inferd.jobs.ids import encode_cursor
from inferd.jobs.maintenance import Maintenance
from inferd.jobs.sql import SqlStore
from inferd.jobs.types import EventKind, JobWrite, Lease, QueueLimits, RequestRecord, RequestStatus

BACKENDS = ["sqlite", "postgres"]
STATUSES = ["queued", "running", "succeeded", "failed", "cancelled", "dead", "expired"]


class Clock:
    """Epoch seconds that move only when told to."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture(params=BACKENDS)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A migrated, empty database of each backend."""
    if request.param == "sqlite":
        path = tmp_path / "inferd.db"
        shutil.copyfile(request.getfixturevalue("sqlite_template"), path)
        return sqlite_url(path)
    return str(request.getfixturevalue("postgres_url"))


@pytest.fixture
async def make_store(store_url: str, clock: Clock) -> AsyncIterator[Callable[..., Any]]:
    """``await make_store(**options)``: a store on the empty database, closed at the end."""
    made: list[SqlStore] = []

    async def make(**options: Any) -> SqlStore:
        store = await SqlStore.connect(store_url, clock=clock, pool_size=10, **options)
        made.append(store)
        if len(made) == 1 and store.engine.dialect.name == "postgresql":
            async with store.engine.begin() as conn:  # the database is the session's
                await conn.execute(text("DELETE FROM inferd_requests"))  # cascades
        return store

    try:
        yield make
    finally:
        for store in made:
            await store.close()


@pytest.fixture
async def store(make_store: Callable[..., Any]) -> SqlStore:
    store: SqlStore = await make_store()
    return store


async def submit(store: SqlStore, user: str = "alice", **overrides: Any) -> str:
    fields: dict[str, Any] = {"model": "echo", "input": {"text": "hi"}, "parameters": {}}
    fields.update(overrides)
    record, created = await store.create(user=user, **fields)
    assert created
    return record.id


async def claim(store: SqlStore, lease_seconds: float = 30, **kwargs: Any) -> Lease:
    lease = await store.claim("worker-1", lease_seconds, **kwargs)
    assert lease is not None
    return lease


async def fetch(store: SqlStore, request_id: str) -> RequestRecord:
    record = await store.get(request_id)
    assert record is not None
    return record


async def kinds(store: SqlStore, request_id: str) -> list[tuple[str, dict[str, Any]]]:
    return [(event.kind.value, event.data) for event in await store.events(request_id)]


# --- create, get, page ------------------------------------------------------------------------


async def test_create_then_get(store: SqlStore, clock: Clock) -> None:
    record, created = await store.create(
        user="alice", model="echo", input=[1, "two", None], parameters={"t": 0.5}
    )
    assert created
    assert record.id.startswith("req_") and record.status is RequestStatus.QUEUED
    assert (record.attempts, record.max_attempts, record.last_seq) == (0, 3, 1)
    assert record.created_at.tzinfo is not None
    assert abs(record.created_at.timestamp() - clock.now) < 1e-5
    assert await store.get(record.id) == record
    assert await store.get(record.id, "alice") == record
    assert await store.get(record.id, "mallory") is None
    assert await store.get("req_01ARZ3NDEKTSV4RRFFQ69G5FAV") is None
    assert await kinds(store, record.id) == [("status", {"status": "queued", "attempt": 0})]


@pytest.mark.parametrize("value", [None, "text", 3.5, [1, [2, {"a": None}]], {"nested": {}}])
async def test_input_may_be_any_json_value(store: SqlStore, value: Any) -> None:
    request_id = await submit(store, input=value)
    record = await fetch(store, request_id)
    assert record.input == value
    assert (await claim(store)).input == value


async def test_ids_sort_by_creation_time(store: SqlStore, clock: Clock) -> None:
    ids = []
    for step in (0.0, 0.0, 0.0, 0.001, 0.5, 0.0, 2.0):
        clock.advance(step)
        ids.append(await submit(store))
    assert ids == sorted(ids)


async def test_page_newest_first_with_cursor(store: SqlStore, clock: Clock) -> None:
    ids = []
    for _ in range(7):
        clock.advance(0.01)
        ids.append(await submit(store))
    await submit(store, user="bob")
    seen, cursor, sizes = [], None, []
    while True:
        page = await store.page("alice", cursor, limit=3)
        sizes.append(len(page.items))
        seen += [item.id for item in page.items]
        assert all(item.user == "alice" for item in page.items)
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == ids[::-1]
    assert sizes == [3, 3, 1]
    assert len((await store.page("bob")).items) == 1
    assert (await store.page("nobody")).items == []


async def test_page_cursor_is_stable_under_concurrent_inserts(store: SqlStore) -> None:
    # All at one instant: the id breaks the tie, which must not disturb the keyset.
    ids = [await submit(store) for _ in range(10)]
    first = await store.page("alice", limit=4)
    assert [i.id for i in first.items] == ids[::-1][:4]
    rest: list[str] = []
    cursor = first.next_cursor

    async def follow() -> None:
        nonlocal cursor
        while cursor is not None:
            page = await store.page("alice", cursor, limit=2)
            rest.extend(item.id for item in page.items)
            cursor = page.next_cursor

    await asyncio.gather(follow(), *(submit(store) for _ in range(10)))
    assert rest == ids[::-1][4:]


GOOD_CURSOR = encode_cursor(1_735_689_600_000_000, "req_01JGFJJZ000000000000000000")


@pytest.mark.parametrize(
    "cursor",
    [
        "",
        "not a cursor",
        "AAAA",
        "x" * 500,
        GOOD_CURSOR[:-3],  # truncated
        GOOD_CURSOR + "A",
        GOOD_CURSOR[:10] + ("A" if GOOD_CURSOR[10] != "A" else "B") + GOOD_CURSOR[11:],
    ],
)
async def test_page_refuses_a_bad_cursor(store: SqlStore, cursor: str) -> None:
    with pytest.raises(BadRequest, match="invalid cursor") as info:
        await store.page("alice", cursor)
    assert info.value.status_code == 400


@pytest.mark.parametrize("limit", [0, -1, 101])
async def test_page_limit_is_validated(store: SqlStore, limit: int) -> None:
    with pytest.raises(BadRequest, match="limit"):
        await store.page("alice", None, limit)


# --- idempotency ------------------------------------------------------------------------------


async def test_same_key_same_body_returns_the_first_request(store: SqlStore) -> None:
    body: dict[str, Any] = {"model": "echo", "input": {"b": 1, "a": [1, 2]}, "parameters": {}}
    first, created = await store.create(user="alice", idempotency_key="k1", **body)
    # The same body with its keys in another order is the same body.
    again, created_again = await store.create(
        user="alice",
        idempotency_key="k1",
        model="echo",
        input={"a": [1, 2], "b": 1},
        parameters={},
    )
    assert created and not created_again
    assert again.id == first.id
    assert (await store.counts())["queued"] == 1


async def test_same_key_other_body_conflicts(store: SqlStore) -> None:
    await store.create(user="alice", model="echo", input=1, parameters={}, idempotency_key="k")
    for changed in ({"input": 2}, {"model": "other"}, {"parameters": {"p": 1}}):
        fields: dict[str, Any] = {"model": "echo", "input": 1, "parameters": {}} | changed
        with pytest.raises(IdempotencyConflict, match="different request body") as info:
            await store.create(user="alice", idempotency_key="k", **fields)
        assert info.value.status_code == 409
    # Keys belong to a user: another user's identical key is another request.
    _, created = await store.create(
        user="bob", model="echo", input=2, parameters={}, idempotency_key="k"
    )
    assert created


async def test_concurrent_creates_with_one_key_make_one_request(store: SqlStore) -> None:
    async def create() -> tuple[str, bool]:
        record, created = await store.create(
            user="alice", model="echo", input="x", parameters={}, idempotency_key="same"
        )
        return record.id, created

    results = await asyncio.gather(*(create() for _ in range(100)))
    assert len({request_id for request_id, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    assert sum((await store.counts()).values()) == 1


# --- claiming ---------------------------------------------------------------------------------


async def test_claim_takes_the_oldest_job_and_marks_it_running(
    store: SqlStore, clock: Clock
) -> None:
    ids: list[str] = []
    for _ in range(3):
        ids.append(await submit(store, input=len(ids)))
        clock.advance(0.01)
    leases = [await claim(store, 60) for _ in ids]
    assert [lease.request_id for lease in leases] == ids
    assert await store.claim("worker-1", 60) is None
    lease = leases[0]
    assert (lease.attempt, lease.model, lease.input, lease.parameters) == (1, "echo", 0, {})
    assert abs(lease.expires_at.timestamp() - (clock.now + 60)) < 1e-5
    assert len({lease.token for lease in leases}) == 3
    record = await fetch(store, ids[0])
    assert (record.status, record.attempts, record.started_at) == (
        RequestStatus.RUNNING,
        1,
        record.updated_at,
    )
    assert (await kinds(store, ids[0]))[-1] == ("status", {"status": "running", "attempt": 1})


async def test_a_lease_carries_the_trace_context_of_the_submit(store: SqlStore) -> None:
    context = {"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"}
    traced = await submit(store, trace_context=context)
    untraced = await submit(store)
    leases = {lease.request_id: lease for lease in [await claim(store), await claim(store)]}
    assert leases[traced].trace_context == context
    assert leases[untraced].trace_context is None
    await store.release(leases[traced])  # and again on the next attempt
    assert (await claim(store)).trace_context == context


async def test_concurrent_claimers_take_each_job_exactly_once(store: SqlStore) -> None:
    ids = {await submit(store, input=n) for n in range(20)}
    taken: list[str] = []

    async def worker(n: int) -> None:
        while (lease := await store.claim(f"w{n}", 30)) is not None:
            taken.append(lease.request_id)

    await asyncio.gather(*(worker(n) for n in range(30)))
    assert sorted(taken) == sorted(ids)


async def test_a_lease_says_whether_its_request_reserved_budget(store: SqlStore) -> None:
    # The worker settles a budget only for a charged request: the others cost no lookup.
    plain = await submit(store)
    reserved = {"key_id": "k1", "user_id": "alice", "day": "2026-01-01", "reserved": 3}
    charged = await submit(store, charge=reserved)
    leases = await store.claim_many("worker-1", 30, 10)
    assert {lease.request_id: lease.charged for lease in leases} == {plain: False, charged: True}


async def test_claim_can_be_restricted_to_models(store: SqlStore) -> None:
    a = await submit(store, model="a")
    b = await submit(store, model="b")
    assert await store.claim("w", 30, models=[]) is None
    assert await store.claim("w", 30, models=["c"]) is None
    assert (await claim(store, models=["b", "c"])).request_id == b
    assert await store.claim("w", 30, models=["b"]) is None
    assert (await claim(store)).request_id == a


async def test_concurrent_creates_are_stored_together_each_whole(store: SqlStore) -> None:
    made = await asyncio.gather(
        *(store.create(user="alice", model="echo", input=n, parameters={}) for n in range(50))
    )
    assert all(created for _, created in made)
    ids = [record.id for record, _ in made]
    assert len(set(ids)) == 50
    for n, request_id in enumerate(ids):
        record = await fetch(store, request_id)
        assert (record.input, record.status, record.last_seq) == (n, RequestStatus.QUEUED, 1)
        assert await kinds(store, request_id) == [("status", {"status": "queued", "attempt": 0})]
    assert len(await store.claim_many("w", 30, 100)) == 50


async def test_a_bad_create_does_not_fail_the_ones_stored_with_it(store: SqlStore) -> None:
    results = await asyncio.gather(
        *(store.create(user="alice", model="echo", input=n, parameters={}) for n in range(5)),
        store.create(user="alice", model="echo", input={1, 2}, parameters={}),  # not JSON
        return_exceptions=True,
    )
    assert isinstance(results[-1], Exception)
    assert all(not isinstance(result, BaseException) and result[1] for result in results[:-1])
    assert (await store.counts())["queued"] == 5


async def test_claim_many_takes_the_oldest_jobs_in_one_claim(store: SqlStore, clock: Clock) -> None:
    ids: list[str] = []
    for n in range(5):
        ids.append(await submit(store, input=n))
        clock.advance(0.01)
    first = await store.claim_many("w", 60, 3)
    assert [lease.request_id for lease in first] == ids[:3]
    assert [lease.input for lease in first] == [0, 1, 2]
    assert all(lease.attempt == 1 for lease in first)
    rest = await store.claim_many("w", 60, 10, models=["echo"])
    assert [lease.request_id for lease in rest] == ids[3:]
    assert await store.claim_many("w", 60, 10) == []
    assert await store.claim_many("w", 60, 0) == []
    for request_id in ids:
        record = await fetch(store, request_id)
        assert (record.status, record.attempts, record.last_seq) == (RequestStatus.RUNNING, 1, 2)
        assert (await kinds(store, request_id))[-1] == (
            "status",
            {"status": "running", "attempt": 1},
        )


async def test_concurrent_batch_claimers_take_each_job_exactly_once(store: SqlStore) -> None:
    ids = {await submit(store, input=n) for n in range(60)}
    taken: list[str] = []

    async def worker(n: int) -> None:
        while leases := await store.claim_many(f"w{n}", 30, 4):
            taken.extend(lease.request_id for lease in leases)

    await asyncio.gather(*(worker(n) for n in range(8)))
    assert sorted(taken) == sorted(ids)


async def test_a_batch_write_is_fenced_per_lease(store: SqlStore, clock: Clock) -> None:
    stale_id = await submit(store, input="stale")
    stale = await claim(store, 5)
    clock.advance(6)
    fresh = await claim(store, 60)  # the same request, taken over after the lease expired
    assert fresh.request_id == stale_id
    streaming_id, done_id = await submit(store, input="s"), await submit(store, input="d")
    leases = await store.claim_many("w", 60, 2)
    streaming, done = sorted(leases, key=lambda lease: lease.input != "s")
    before = await store.get(stale_id)
    results = await store.write(
        [
            JobWrite(streaming, ({"response": "a"}, {"response": "b"})),
            JobWrite(stale, ({"response": "stale"},), done=True, result="stale"),
            JobWrite(done, ({"response": "only"},), done=True, result={"r": 1}),
        ]
    )
    assert results[1] is None
    assert await store.get(stale_id) == before
    appended, finished = results[0], results[2]
    assert appended is not None and finished is not None
    assert [(e.seq, e.kind.value, e.data["response"]) for e in appended] == [
        (3, "response", "a"),
        (4, "response", "b"),
    ]
    assert [(e.seq, e.kind.value) for e in finished] == [(3, "response"), (4, "done")]
    assert finished[-1].data == {"status": "succeeded", "result": {"r": 1}}
    record = await fetch(store, streaming_id)
    assert (record.status, record.last_seq) == (RequestStatus.RUNNING, 4)
    assert [r["response"] for r in record.responses] == ["a", "b"]
    assert all(r["sent_at"] for r in record.responses)
    record = await fetch(store, done_id)
    assert (record.status, record.result, record.last_seq) == (
        RequestStatus.SUCCEEDED,
        {"r": 1},
        4,
    )
    assert record.finished_at is not None
    assert [r["response"] for r in record.responses] == ["only"]
    assert [e.seq for e in await store.events(done_id)] == [1, 2, 3, 4]
    # The finished request's job is gone; the running one still writes, a finished one not.
    assert await store.write([JobWrite(done, ({"response": "late"},))]) == [None]
    again = await store.write([JobWrite(streaming, done=True, result="end")])
    assert again[0] is not None and [e.seq for e in again[0]] == [5]
    assert (await fetch(store, streaming_id)).status is RequestStatus.SUCCEEDED
    assert (await store.counts())["succeeded"] == 2
    assert await store.write([]) == []
    with pytest.raises(ValueError, match="one write per lease"):
        await store.write([JobWrite(fresh), JobWrite(fresh)])


async def test_a_write_of_streamed_chunks_alone_is_fenced_per_lease(
    store: SqlStore, clock: Clock
) -> None:
    """Chunks only (on SQLite, the shorter transaction of one or two leases): each lease's
    chunks take its next seqs, a lease no longer valid writes nothing."""
    stale_id = await submit(store, input="stale")
    stale = await claim(store, 5)
    clock.advance(6)
    live_id = await submit(store, input="live")
    leases = await store.claim_many("w", 60, 2)
    live = next(lease for lease in leases if lease.request_id == live_id)
    before = await store.get(stale_id)
    results = await store.write(
        [
            JobWrite(stale, ({"response": "stale"},)),
            JobWrite(live, ({"response": "a"}, {"response": "b"})),
        ]
    )
    assert results[0] is None
    assert await store.get(stale_id) == before
    assert results[1] is not None
    assert [(e.seq, e.attempt, e.data["response"]) for e in results[1]] == [
        (3, 1, "a"),
        (4, 1, "b"),
    ]
    again = await store.write([JobWrite(live, ({"response": "c"},))])
    assert again[0] is not None and [e.seq for e in again[0]] == [5]
    record = await fetch(store, live_id)
    assert (record.status, record.last_seq) == (RequestStatus.RUNNING, 5)
    assert [r["response"] for r in record.responses] == ["a", "b", "c"]
    assert [e.seq for e in await store.events(live_id)] == [1, 2, 3, 4, 5]


async def test_a_batch_write_that_waits_for_a_lock_follows_what_committed_meanwhile(
    store: SqlStore,
) -> None:
    """A write held up by another transaction on its job (a cancel, say) takes its seqs after
    the events that transaction stored, and sees its changes."""
    request_id = await submit(store)
    lease = await claim(store, 60)
    async with store.engine.connect() as other:
        transaction = await other.begin()
        await other.execute(
            text("SELECT request_id FROM inferd_jobs WHERE request_id = :id FOR UPDATE")
            if store.engine.dialect.name == "postgresql"
            else text("SELECT request_id FROM inferd_jobs WHERE request_id = :id"),
            {"id": request_id},
        )
        seq = (
            await other.execute(
                text(
                    "UPDATE inferd_requests SET last_seq = last_seq + 1, cancel_requested = :yes"
                    " WHERE id = :id RETURNING last_seq"
                ),
                {"id": request_id, "yes": True},
            )
        ).scalar_one()
        await other.execute(
            text(
                "INSERT INTO inferd_events (request_id, seq, kind, attempt, data, created_at)"
                " VALUES (:id, :seq, 'status', 1, '{}', 0)"
            ),
            {"id": request_id, "seq": seq},
        )
        writing = asyncio.create_task(store.write([JobWrite(lease, ({"response": "x"},))]))
        await asyncio.sleep(0.3)
        assert not writing.done()  # it waits for the lock
        await transaction.commit()
    (written,) = await asyncio.wait_for(writing, 10)
    assert written is not None and [e.seq for e in written] == [seq + 1]
    record = await fetch(store, request_id)
    assert (record.last_seq, record.cancel_requested) == (seq + 1, True)
    assert [e.seq for e in await store.events(request_id)] == list(range(1, seq + 2))


@pytest.mark.parametrize("store_url", ["postgres"], indirect=True)  # SQLite: no round trips
async def test_a_claim_and_a_batch_write_are_one_statement_each_on_postgresql(
    store: SqlStore,
) -> None:
    """On PostgreSQL a claim and a group write are one round trip each: no BEGIN, no COMMIT,
    one statement."""
    assert store.engine.dialect.name == "postgresql"
    assert store.hot is not None
    await store.hot.warm(1)
    # Once first: asyncpg reads the types of a statement new to the connection.
    warm = await submit(store, input="w")
    (lease,) = await store.claim_many("w", 60, 1)
    assert lease.request_id == warm
    await store.write([JobWrite(lease, ({"response": "w"},), done=True, result=1)])
    first, second = await submit(store, input="a"), await submit(store, input="b")
    seen: list[str] = []

    def note(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        seen.append(statement)

    def noted(record: Any) -> None:  # asyncpg's query logger: the hot statements' connections
        seen.append(record.query)

    event.listen(store.engine.sync_engine, "before_cursor_execute", note)
    store.hot.add_query_logger(noted)
    try:
        leases = await store.claim_many("w", 60, 2)
        await asyncio.sleep(0)  # asyncpg calls its loggers soon after the query
        claimed, seen[:] = list(seen), []
        leases.sort(key=lambda lease: lease.input != "a")
        results = await store.write(
            [
                JobWrite(leases[0], ({"response": "a"},)),
                JobWrite(leases[1], ({"response": "b"},), done=True, result=[1, 2]),
            ]
        )
        await asyncio.sleep(0)
    finally:
        event.remove(store.engine.sync_engine, "before_cursor_execute", note)
        store.hot.remove_query_logger(noted)
    assert len(claimed) == 1 and "BEGIN" not in claimed[0].upper()
    assert len(seen) == 1 and "BEGIN" not in seen[0].upper()
    assert [(lease.input, lease.attempt, lease.charged) for lease in leases] == [
        ("a", 1, False),
        ("b", 1, False),
    ]
    assert [[e.seq for e in r] for r in results if r is not None] == [[3], [3, 4]]
    assert (await fetch(store, first)).status is RequestStatus.RUNNING
    assert (await fetch(store, second)).result == [1, 2]


async def test_submits_that_keep_coming_are_stored_together_and_a_lone_one_at_once(
    make_store: Callable[..., Any],
) -> None:
    """``create_interval``: while submits crowd, a group commit starts at most that often and
    holds the ones that came meanwhile; submits one after the other are not held back."""

    async def batches(store: SqlStore) -> list[int]:
        sizes: list[int] = []
        inner = store._insert_created_at_once

        async def counted(items: Any) -> bool:
            sizes.append(len(items))
            return await inner(items)

        store._insert_created_at_once = counted  # type: ignore[method-assign]

        async def spaced(i: int) -> str:  # five at once, then one every 10 ms
            await asyncio.sleep(0.01 * max(0, i - 4))
            return await submit(store, input=i)

        ids = await asyncio.gather(*(spaced(i) for i in range(20)))
        assert len(set(ids)) == 20
        return sizes

    spaced_out = await batches(await make_store(create_interval=0.3))
    assert sum(spaced_out) == 20 and len(spaced_out) <= 3, spaced_out
    at_once = await batches(await make_store(create_interval=0))
    assert sum(at_once) == 20 and len(at_once) >= 10, at_once  # one each after the five

    store = await make_store(create_interval=0.5)
    started = time.monotonic()
    for i in range(5):  # one client, one submit after the other
        await submit(store, input=i)
    assert time.monotonic() - started < 1.0


async def test_a_slow_claim_counts_the_lease_from_its_end(
    make_store: Callable[..., Any], store_url: str
) -> None:
    """A claim that took long (a busy machine) gives leases that start when it ended, not
    when it began: the job does not start with part of its lease already spent."""
    store: SqlStore = await make_store()
    request_id = await submit(store)
    ticks = iter(range(1000))
    start = time.time()

    def slow_clock() -> float:  # every reading is 50 ms after the one before
        return start + 0.05 * next(ticks)

    slow = await SqlStore.connect(store_url, clock=slow_clock)
    try:
        (lease,) = await slow.claim_many("w", 10, 1)
    finally:
        await slow.close()
    assert lease.request_id == request_id
    read = next(ticks)  # the clock's next reading: the claim read it ``read`` times
    assert read >= 2
    claimed_at = start + 0.05 * (read - 1)  # its last reading, once the statement had run
    assert abs(lease.expires_at.timestamp() - (claimed_at + 10)) < 1e-5
    async with store.engine.connect() as conn:
        stored = (
            await conn.execute(
                text("SELECT lease_expires_at FROM inferd_jobs WHERE request_id = :id"),
                {"id": request_id},
            )
        ).scalar_one()
    assert stored == round((claimed_at + 10) * 1_000_000)


async def test_heartbeat_extends_the_lease(store: SqlStore, clock: Clock) -> None:
    await submit(store)
    lease = await claim(store, 10)
    clock.advance(8)
    assert await store.heartbeat(lease, 10)
    clock.advance(8)  # past the first expiry, within the extended one
    assert await store.append(lease, {"response": "still mine"}) is not None
    assert await store.claim("worker-2", 10) is None
    clock.advance(3)
    assert await store.append(lease, {"response": "too late"}) is None
    assert not await store.heartbeat(lease, 10)


async def test_an_expired_lease_writes_nothing_once_reclaimed(
    store: SqlStore, clock: Clock
) -> None:
    request_id = await submit(store)
    old = await claim(store, 5)
    assert await store.append(old, {"response": "a"}) is not None
    clock.advance(6)
    new = await store.claim("worker-2", 5)
    assert new is not None and new.request_id == request_id and new.attempt == 2
    before = await store.get(request_id)
    assert await store.append(old, {"response": "stale"}) is None
    assert await store.complete(old, "stale") is None
    assert await store.fail(old, "stale") is None
    assert await store.finish_cancelled(old) is None
    assert not await store.heartbeat(old, 5)
    assert not await store.release(old)
    assert await store.get(request_id) == before
    assert (await store.complete(new, "fresh")) is not None
    record = await fetch(store, request_id)
    assert record.result == "fresh"
    history = await kinds(store, request_id)
    assert [data.get("response") for kind, data in history if kind == "response"] == ["a"]
    assert [item for item in history if item[0] != "response"] == [
        ("status", {"status": "queued", "attempt": 0}),
        ("status", {"status": "running", "attempt": 1}),
        ("status", {"status": "queued", "attempt": 1, "reason": "lease expired"}),
        ("status", {"status": "running", "attempt": 2}),
        ("done", {"status": "succeeded", "result": "fresh"}),
    ]


async def test_an_expired_lease_writes_nothing_even_before_reclaim(
    store: SqlStore, clock: Clock
) -> None:
    request_id = await submit(store)
    lease = await claim(store, 5)
    clock.advance(5)  # expiry is exclusive: at expires_at the lease is gone
    assert await store.complete(lease, "late") is None
    record = await fetch(store, request_id)
    assert record.status is RequestStatus.RUNNING


# --- events and responses ---------------------------------------------------------------------


async def test_event_seqs_are_contiguous_and_resumable(store: SqlStore, clock: Clock) -> None:
    request_id = await submit(store)
    lease = await claim(store)
    for n in range(5):
        event = await store.append(lease, {"response": n})
        assert event is not None and event.seq == 3 + n and event.kind is EventKind.RESPONSE
    await store.fail(lease, "boom")
    clock.advance(60)
    lease = await claim(store)
    await store.append(lease, {"response": "again"})
    done = await store.complete(lease, {"n": 6})
    assert done is not None and done.kind is EventKind.DONE
    stored = await store.events(request_id)
    assert [event.seq for event in stored] == list(range(1, done.seq + 1))
    assert [e.seq for e in await store.events(request_id, after=4, limit=3)] == [5, 6, 7]
    assert await store.events(request_id, after=done.seq) == []
    record = await fetch(store, request_id)
    assert record.last_seq == done.seq
    assert [e.attempt for e in stored] == [0, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2]


async def test_responses_are_those_of_the_latest_attempt(store: SqlStore, clock: Clock) -> None:
    request_id = await submit(store)
    lease = await claim(store)
    await store.append(lease, {"response": "a"})
    await store.append(lease, {"response": "b", "sent_at": "2025-01-01T00:00:00Z"})
    record = await fetch(store, request_id)
    assert [r["response"] for r in record.responses] == ["a", "b"]
    assert record.responses[1]["sent_at"] == "2025-01-01T00:00:00Z"
    assert record.responses[0]["sent_at"].endswith("Z")
    await store.fail(lease, "transient")
    record = await fetch(store, request_id)  # attempt 1 is still the latest until 2 starts
    assert [r["response"] for r in record.responses] == ["a", "b"]
    clock.advance(60)
    lease = await claim(store)
    record = await fetch(store, request_id)
    assert record.responses == []
    await store.append(lease, {"response": "c"})
    record = await fetch(store, request_id)
    assert [r["response"] for r in record.responses] == ["c"]
    (listed,) = (await store.page("alice")).items
    assert listed.responses == record.responses


# --- failures and retries ---------------------------------------------------------------------


async def test_retry_waits_for_its_backoff(store: SqlStore, clock: Clock) -> None:
    request_id = await submit(store)
    lease = await claim(store)
    event = await store.fail(lease, "flaky")
    assert event is not None and event.kind is EventKind.STATUS
    assert event.data["status"] == "queued" and event.data["attempt"] == 1
    assert event.data["reason"] == "flaky"
    record = await fetch(store, request_id)
    assert record.status is RequestStatus.QUEUED
    assert record.error == "flaky"
    # Attempt 1 waits 1 s scaled by a jitter in [0.5, 1].
    clock.advance(0.49)
    assert await store.claim("w", 30) is None
    clock.advance(0.51)
    lease = await claim(store)
    assert lease.attempt == 2
    # Attempt 2 waits 2 s scaled by [0.5, 1].
    event = await store.fail(lease, "flaky again")
    assert event is not None
    clock.advance(0.99)
    assert await store.claim("w", 30) is None
    clock.advance(1.01)
    assert (await claim(store)).attempt == 3


async def test_retry_at_is_announced(make_store: Callable[..., Any], clock: Clock) -> None:
    store = await make_store(backoff_base=10, backoff_max=15)
    await submit(store, max_attempts=5)
    delays = []
    for _ in range(3):
        event = await store.fail(await claim(store), "again")
        assert event is not None
        retry_at = event.created_at.fromisoformat(event.data["retry_at"])
        delays.append((retry_at - event.created_at).total_seconds())
        clock.advance(15)
    assert 5 <= delays[0] <= 10 and 7.5 <= delays[1] <= 15 and 7.5 <= delays[2] <= 15


async def test_dead_after_exactly_max_attempts(store: SqlStore, clock: Clock) -> None:
    request_id = await submit(store, max_attempts=3)
    for attempt in (1, 2, 3):
        lease = await claim(store)
        assert lease.attempt == attempt
        event = await store.fail(lease, f"failure {attempt}")
        clock.advance(60)
    assert event is not None and event.kind is EventKind.ERROR
    assert event.data == {"status": "dead", "error": "failure 3"}
    record = await fetch(store, request_id)
    assert (record.status, record.attempts, record.error) == (RequestStatus.DEAD, 3, "failure 3")
    assert record.finished_at is not None and record.terminal
    assert await store.claim("w", 30) is None


async def test_dead_after_max_attempts_of_expired_leases(store: SqlStore, clock: Clock) -> None:
    request_id = await submit(store, max_attempts=2)
    await claim(store, 5)
    clock.advance(6)
    assert await store.reap_expired() == 1
    assert (await kinds(store, request_id))[-1] == (
        "status",
        {"status": "queued", "attempt": 1, "reason": "lease expired"},
    )
    assert await store.reap_expired() == 0
    assert (await claim(store, 5)).attempt == 2
    clock.advance(6)
    assert await store.claim("w", 5) is None  # the claim reaps first, then finds nothing
    record = await fetch(store, request_id)
    assert record.status is RequestStatus.DEAD
    assert record.error == "lease expired on the last attempt"
    assert (await kinds(store, request_id))[-1] == (
        "error",
        {"status": "dead", "error": "lease expired on the last attempt"},
    )


async def test_non_retryable_failure_fails_at_once(store: SqlStore) -> None:
    request_id = await submit(store)
    event = await store.fail(await claim(store), "bad input", retryable=False)
    assert event is not None and event.data == {"status": "failed", "error": "bad input"}
    record = await fetch(store, request_id)
    assert record.status is RequestStatus.FAILED and record.attempts == 1


async def test_release_gives_the_job_back_without_burning_an_attempt(store: SqlStore) -> None:
    request_id = await submit(store, max_attempts=1)
    assert await store.release(await claim(store))
    record = await fetch(store, request_id)
    assert (record.status, record.attempts) == (RequestStatus.QUEUED, 0)
    assert (await kinds(store, request_id))[-1] == (
        "status",
        {"status": "queued", "attempt": 0, "reason": "worker shut down"},
    )
    lease = await claim(store)
    assert lease.attempt == 1
    assert await store.complete(lease, "ok") is not None


# --- cancel -----------------------------------------------------------------------------------


async def test_cancel_a_queued_request(store: SqlStore) -> None:
    request_id = await submit(store)
    assert await store.cancel(request_id, "mallory") is None
    record = await store.cancel(request_id, "alice")
    assert record is not None and record.status is RequestStatus.CANCELLED
    assert record.finished_at is not None and record.error == "cancelled by the user"
    assert (await kinds(store, request_id))[-1] == (
        "error",
        {"status": "cancelled", "error": "cancelled by the user"},
    )
    assert await store.claim("w", 30) is None


async def test_cancel_a_running_request(store: SqlStore) -> None:
    request_id = await submit(store)
    lease = await claim(store)
    record = await store.cancel(request_id, "alice")
    assert record is not None
    assert record.status is RequestStatus.RUNNING and record.cancel_requested
    assert record.last_seq == 2  # no event until the worker stops
    assert not await store.heartbeat(lease, 30)  # the signal to stop
    assert await store.append(lease, {"response": "last words"}) is not None
    event = await store.finish_cancelled(lease)
    assert event is not None
    assert event.data == {"status": "cancelled", "error": "cancelled by the user"}
    record = await fetch(store, request_id)
    assert record.status is RequestStatus.CANCELLED
    assert record.error == "cancelled by the user" and record.finished_at is not None


async def test_a_cancelled_request_is_not_requeued(store: SqlStore, clock: Clock) -> None:
    failing, released, expiring = [await submit(store) for _ in range(3)]
    leases = [await claim(store, 5) for _ in range(3)]
    for request_id in (failing, released, expiring):
        await store.cancel(request_id)
    await store.fail(leases[0], "transient")
    assert await store.release(leases[1])
    clock.advance(6)
    assert await store.reap_expired() == 1
    for request_id in (failing, released, expiring):
        record = await fetch(store, request_id)
        assert record.status is RequestStatus.CANCELLED
        assert record.error == "cancelled by the user"
        assert (await kinds(store, request_id))[-1][0] == "error"


async def test_cancel_a_terminal_request_changes_nothing(store: SqlStore) -> None:
    request_id = await submit(store)
    await store.complete(await claim(store), 42)
    before = await store.get(request_id)
    assert await store.cancel(request_id) == before
    assert await store.cancel("req_01ARZ3NDEKTSV4RRFFQ69G5FAV") is None


# --- queue controls: bounded queue, expiry, deduplication, dead letters, retention ----------


async def test_the_queue_of_a_model_is_bounded(store: SqlStore) -> None:
    limits = QueueLimits(max_queued=3, retry_after=7)
    ids = [await submit(store, limits=limits) for _ in range(3)]
    with pytest.raises(QueueFull, match="full") as info:
        await submit(store, limits=limits)
    assert info.value.status_code == 503 and info.value.headers() == {"retry-after": "7"}
    assert await submit(store, model="other", limits=limits)  # another model's queue
    assert (await store.counts())["queued"] == 4  # nothing was stored, nothing dropped
    lease = await claim(store, models=["echo"])  # a running job no longer waits
    assert await submit(store, limits=limits)
    await store.complete(lease, "ok")
    for request_id in ids[1:]:
        assert (await fetch(store, request_id)).status is RequestStatus.QUEUED


async def test_submits_stored_together_past_a_bound_store_what_fits(store: SqlStore) -> None:
    """Creates that arrive together are stored in one batch; when the batch would go past a
    bound, each is counted on its own: as many as fit are stored, the others refused."""
    limits = QueueLimits(max_queued=3, max_queued_per_key=5, key_id="k1")
    charge = {"key_id": "k1", "user_id": "alice", "day": "2026-01-01", "reserved": 3}
    outcomes = await asyncio.gather(
        *(submit(store, input=n, limits=limits) for n in range(5)), return_exceptions=True
    )
    refused = [o for o in outcomes if isinstance(o, BaseException)]
    assert len(refused) == 2 and all(isinstance(o, QueueFull) for o in refused)
    assert (await store.counts())["queued"] == 3
    # Below the bounds, a batch with other models and a budget charge is stored whole.
    others = await asyncio.gather(
        submit(store, model="a", limits=limits, charge=charge),
        submit(store, model="b", limits=QueueLimits(max_queued=1)),
        submit(store, model="b"),
    )
    assert len(set(others)) == 3 and (await store.counts())["queued"] == 6
    leases = await store.claim_many("w", 30, 10, models=["a", "b"])
    assert sorted(lease.charged for lease in leases) == [False, False, True]


async def test_the_queued_requests_of_a_key_are_bounded(store: SqlStore) -> None:
    mine = QueueLimits(max_queued_per_key=2, key_id="k1")
    await submit(store, limits=mine)
    await submit(store, limits=mine)
    with pytest.raises(TooManyQueued) as info:
        await submit(store, limits=mine)
    assert info.value.status_code == 429 and "retry-after" in info.value.headers()
    await submit(store, limits=QueueLimits(max_queued_per_key=2, key_id="k2"))
    await submit(store, limits=QueueLimits(max_queued_per_key=2))  # no key: not counted
    assert (await store.counts())["queued"] == 4


async def test_a_request_not_started_in_time_expires(store: SqlStore, clock: Clock) -> None:
    late = await submit(store, ttl_seconds=10)
    kept = await submit(store, ttl_seconds=60)
    forever = await submit(store)
    record = await fetch(store, late)
    assert record.expires_at is not None
    assert abs(record.expires_at.timestamp() - (clock.now + 10)) < 1e-5
    assert await store.expire_due() == []
    clock.advance(10)  # expiry is inclusive: at expires_at it may no longer start
    lease = await claim(store)  # the claim skips the expired job, even before the sweep
    assert lease.request_id == kept
    assert await store.claim("w", 30) is not None  # forever
    ended = await store.expire_due()
    assert [(model, event.request_id) for model, event in ended] == [("echo", late)]
    event = ended[0][1]
    assert event.kind is EventKind.ERROR and event.data["status"] == "expired"
    assert "expired at" in event.data["error"]
    record = await fetch(store, late)
    assert record.status is RequestStatus.EXPIRED and record.terminal
    assert record.attempts == 0 and record.finished_at is not None
    assert (await kinds(store, late))[-1] == ("error", event.data)
    assert await store.expire_due() == []
    assert (await store.counts())["expired"] == 1
    assert (await fetch(store, forever)).status is RequestStatus.RUNNING


async def test_expires_at_is_an_instant(store: SqlStore, clock: Clock) -> None:
    request_id = await submit(store, expires_at=clock.now + 5)
    clock.advance(4.9)
    assert await store.expire_due() == []
    clock.advance(0.1)
    assert len(await store.expire_due()) == 1
    assert (await fetch(store, request_id)).status is RequestStatus.EXPIRED
    with pytest.raises(BadRequest, match="not both"):
        await submit(store, expires_at=clock.now + 5, ttl_seconds=5)


async def test_a_retry_that_waits_past_the_ttl_expires(store: SqlStore, clock: Clock) -> None:
    request_id = await submit(store, ttl_seconds=30)
    await store.fail(await claim(store), "flaky")
    clock.advance(31)
    assert await store.claim("w", 30) is None
    assert len(await store.expire_due()) == 1
    record = await fetch(store, request_id)
    assert (record.status, record.attempts) == (RequestStatus.EXPIRED, 1)


async def test_a_cancelled_or_running_request_does_not_expire(
    store: SqlStore, clock: Clock
) -> None:
    running = await submit(store, ttl_seconds=1)
    cancelled = await submit(store, ttl_seconds=1)
    lease = await claim(store)
    await store.cancel(cancelled)
    clock.advance(2)
    assert await store.expire_due() == []
    assert await store.complete(lease, "ok") is not None
    assert (await fetch(store, running)).status is RequestStatus.SUCCEEDED
    assert (await fetch(store, cancelled)).status is RequestStatus.CANCELLED


DEDUP = 600.0


async def test_dedup_answers_from_a_stored_result(store: SqlStore, clock: Clock) -> None:
    body: dict[str, Any] = {"input": {"text": "same"}, "parameters": {"p": 1}, "version": "1"}
    original = await submit(store, dedup_seconds=DEDUP, **body)
    lease = await claim(store)
    await store.append(lease, {"response": "a"})
    await store.append(lease, {"response": "b"})
    await store.complete(lease, {"text": "ab"})
    clock.advance(DEDUP - 1)
    record, created = await store.create(user="bob", model="echo", dedup_seconds=DEDUP, **body)
    assert created and record.id != original
    assert record.deduplicated and record.deduplicated_from == original
    assert record.status is RequestStatus.SUCCEEDED and record.result == {"text": "ab"}
    assert [r["response"] for r in record.responses] == ["a", "b"]
    assert await fetch(store, record.id) == record
    history = await kinds(store, record.id)
    assert [(k, d.get("response")) for k, d in history] == [
        ("response", "a"),
        ("response", "b"),
        ("done", None),
    ]
    assert history[-1][1] == {
        "status": "succeeded",
        "result": {"text": "ab"},
        "deduplicated_from": original,
    }
    assert await store.claim("w", 30) is None  # nothing was queued
    # Another version, input or parameters is another request; so is a stale result.
    for changed in ({"version": "2"}, {"input": "other"}, {"parameters": {}}):
        fresh, _ = await store.create(
            user="bob", model="echo", dedup_seconds=DEDUP, **(body | changed)
        )
        assert not fresh.deduplicated and fresh.status is RequestStatus.QUEUED
    clock.advance(2)
    stale, _ = await store.create(user="bob", model="echo", dedup_seconds=DEDUP, **body)
    assert not stale.deduplicated
    # Without dedup_seconds (the model did not opt in) nothing is shared.
    alone, _ = await store.create(user="bob", model="echo", **body)
    assert not alone.deduplicated


async def test_dedup_joins_a_running_request(store: SqlStore) -> None:
    body: dict[str, Any] = {"input": "same", "parameters": {}}
    original = await submit(store, dedup_seconds=DEDUP, **body)
    lease = await claim(store)
    joined, created = await store.create(user="bob", model="echo", dedup_seconds=DEDUP, **body)
    assert created and joined.deduplicated_from == original
    assert joined.status is RequestStatus.QUEUED
    again, _ = await store.create(user="carol", model="echo", dedup_seconds=DEDUP, **body)
    assert again.deduplicated_from == original  # joins the original, not the joiner
    assert await store.claim("w", 30) is None  # run once
    assert await store.settle_joined() == []  # still running
    await store.append(lease, {"response": "x"})
    await store.complete(lease, "result")
    settled = await store.settle_joined()
    assert {event.request_id for event in settled} == {joined.id, again.id}
    for request_id in (joined.id, again.id):
        record = await fetch(store, request_id)
        assert (record.status, record.result) == (RequestStatus.SUCCEEDED, "result")
        assert [r["response"] for r in record.responses] == ["x"]
        assert [k for k, _ in await kinds(store, request_id)] == ["status", "response", "done"]
    assert await store.settle_joined() == []


async def test_joined_requests_share_a_failure_and_outlive_a_cancel(
    store: SqlStore, clock: Clock
) -> None:
    body: dict[str, Any] = {"input": "same", "parameters": {}, "dedup_seconds": DEDUP}
    failing = await submit(store, max_attempts=1, **body)
    joined, _ = await store.create(user="bob", model="echo", **body)
    await store.fail(await claim(store), "boom")
    await store.settle_joined()
    record = await fetch(store, joined.id)
    assert (record.status, record.error) == (RequestStatus.DEAD, "boom")
    assert (await fetch(store, failing)).status is RequestStatus.DEAD
    # Requeued, a request that had joined runs on its own (and is not settled again).
    assert await store.requeue(joined.id, 1) is not None
    assert await store.settle_joined() == []
    lease = await claim(store)
    assert lease.request_id == joined.id
    await store.complete(lease, "ran")
    assert (await fetch(store, joined.id)).deduplicated_from is None
    # A cancelled original: the joiner runs on its own.
    clock.advance(1)
    body["input"] = "again"
    cancelled = await submit(store, **body)
    joined, _ = await store.create(user="bob", model="echo", **body)
    await store.cancel(cancelled)
    (event,) = await store.settle_joined()
    assert event.data["status"] == "queued" and "cancelled" in event.data["reason"]
    lease = await claim(store)
    assert lease.request_id == joined.id
    await store.complete(lease, "mine")
    record = await fetch(store, joined.id)
    assert (record.status, record.result, record.deduplicated) == (
        RequestStatus.SUCCEEDED,
        "mine",
        False,
    )


async def test_a_dead_request_can_be_listed_and_requeued(store: SqlStore, clock: Clock) -> None:
    dead = await submit(store, max_attempts=1)
    await store.fail(await claim(store), "crashed")
    done = await submit(store)
    await store.complete(await claim(store), "ok")
    expired = await submit(store, ttl_seconds=1)
    clock.advance(2)
    await store.expire_due()
    page = await store.dead_letters([RequestStatus.DEAD])
    assert [r.id for r in page.items] == [dead]
    both = await store.dead_letters([RequestStatus.DEAD, RequestStatus.EXPIRED], limit=1)
    assert [r.id for r in both.items] == [expired] and both.next_cursor is not None
    rest = await store.dead_letters(
        [RequestStatus.DEAD, RequestStatus.EXPIRED], cursor=both.next_cursor
    )
    assert [r.id for r in rest.items] == [dead] and rest.next_cursor is None
    assert (await store.dead_letters([RequestStatus.DEAD], model="other")).items == []

    requeued = await store.requeue(dead, 2)
    assert requeued is not None
    record, event = requeued
    assert (record.status, record.attempts, record.max_attempts) == (RequestStatus.QUEUED, 1, 3)
    assert record.finished_at is None
    assert event.data == {"status": "queued", "attempt": 1, "reason": "requeued by an admin"}
    assert (await store.dead_letters([RequestStatus.DEAD])).items == []
    lease = await claim(store)
    assert (lease.request_id, lease.attempt) == (dead, 2)
    await store.complete(lease, "second time lucky")
    record = await fetch(store, dead)
    assert (record.status, record.result) == (RequestStatus.SUCCEEDED, "second time lucky")
    seqs = [e.seq for e in await store.events(dead)]
    assert seqs == list(range(1, len(seqs) + 1))

    assert await store.requeue(expired, 1) is not None
    assert (await fetch(store, expired)).expires_at is None  # its deadline is gone
    with pytest.raises(InvalidState, match="succeeded") as info:
        await store.requeue(done, 1)
    assert info.value.status_code == 409
    assert await store.requeue("req_01ARZ3NDEKTSV4RRFFQ69G5FAV", 1) is None


async def test_retention_deletes_old_finished_requests_in_batches(
    store: SqlStore, clock: Clock
) -> None:
    old = []
    for n in range(5):
        request_id = await submit(store, input=n)
        lease = await claim(store)
        await store.append(lease, {"response": n})
        await store.complete(lease, n)
        old.append(request_id)
    waiting = await submit(store)  # old too, but not finished: kept
    clock.advance(3 * 86400)
    recent = await submit(store, model="other")
    await store.complete(await claim(store, models=["other"]), "recent")
    assert await store.purge(2 * 86400, limit=2) == 2
    assert await store.purge(2 * 86400, limit=2) == 2
    assert await store.purge(2 * 86400, limit=2) == 1
    assert await store.purge(2 * 86400, limit=2) == 0
    for request_id in old:
        assert await store.get(request_id) is None
        assert await store.events(request_id) == []
    assert (await fetch(store, waiting)).status is RequestStatus.QUEUED
    assert (await fetch(store, recent)).status is RequestStatus.SUCCEEDED
    assert await store.events(recent)


async def test_maintenance_runs_retention_in_batches_and_expiry_periodically(
    store: SqlStore, clock: Clock
) -> None:
    for n in range(7):
        await store.complete(await claim_new(store, n), n)
    clock.advance(2 * 86400)
    kept = await submit(store, model="other")
    await store.complete(await claim(store, models=["other"]), "recent")
    expiring = await submit(store, model="other", ttl_seconds=1)
    clock.advance(1)
    bus = InProcessEventBus()
    batches: list[int] = []
    expired: list[str] = []
    all_deleted = asyncio.Event()

    def purged(count: int) -> None:
        batches.append(count)
        if sum(batches) >= 7:
            all_deleted.set()

    async def on_expired(model: str, event: Any) -> None:
        expired.append(event.request_id)

    maintenance = Maintenance(
        store,
        bus,
        expiry_interval=0.01,
        retention_days=1.5,
        retention_interval=0.01,
        batch=3,
        pause=0,
        on_expired=on_expired,
        on_purged=purged,
    )
    followed = bus.subscribe(expiring)
    task = asyncio.create_task(maintenance.run())
    try:
        announced = await asyncio.wait_for(anext(followed), 10)
        await asyncio.wait_for(all_deleted.wait(), 10)
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await bus.close()
    assert batches[:3] == [3, 3, 1]  # in batches of 3, each its own transaction
    assert expired == [expiring]
    assert announced == (await fetch(store, expiring)).last_seq
    assert (await fetch(store, expiring)).status is RequestStatus.EXPIRED
    assert (await fetch(store, kept)).status is RequestStatus.SUCCEEDED
    assert len((await store.page("alice", limit=100)).items) == 2


async def claim_new(store: SqlStore, value: Any) -> Lease:
    """Submit a request and claim it at once."""
    request_id = await submit(store, input=value)
    lease = await claim(store)
    assert lease.request_id == request_id
    return lease


# --- counts, migrations, availability ---------------------------------------------------------


async def test_counts_every_status(store: SqlStore) -> None:
    assert await store.counts() == dict.fromkeys(STATUSES, 0)
    for _ in range(5):
        await submit(store)
    await store.complete(await claim(store), None)
    await store.fail(await claim(store), "no", retryable=False)
    await claim(store)
    (queued, *_) = (await store.page("alice")).items
    await store.cancel(queued.id)
    assert await store.counts() == dict.fromkeys(STATUSES, 1) | {"dead": 0, "expired": 0}


history = table(VERSION_TABLE, column("version_num"))


def _schema_diff(connection: Connection) -> list[Any]:
    context = MigrationContext.configure(connection, opts={"version_table": VERSION_TABLE})
    return list(compare_metadata(context, metadata))


async def test_migrations_are_idempotent_and_match_the_schema(store_url: str) -> None:
    # The database was migrated once already (a fresh copy of it, for SQLite).
    await migrate(store_url)
    await migrate(store_url)
    store = SqlStore(store_url)
    try:
        async with store.engine.connect() as conn:
            assert await conn.run_sync(_schema_diff) == []
            version = await conn.scalar(select(column("version_num")).select_from(history))
        assert version == "0007"
    finally:
        await store.close()


async def test_migrate_creates_the_folder_of_a_new_sqlite_file(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "folder" / "inferd.db"
    await migrate(sqlite_url(path))
    store = await SqlStore.connect(sqlite_url(path))
    try:
        assert await store.counts() == dict.fromkeys(STATUSES, 0)
    finally:
        await store.close()


async def test_sqlite_connections_are_configured(tmp_path: Path, sqlite_template: Path) -> None:
    path = tmp_path / "inferd.db"
    shutil.copyfile(sqlite_template, path)
    store = SqlStore(sqlite_url(path), busy_timeout=2.5)
    try:
        async with store.engine.connect() as conn:
            pragmas = [
                await conn.scalar(text("PRAGMA journal_mode")),
                await conn.scalar(text("PRAGMA busy_timeout")),
                await conn.scalar(text("PRAGMA synchronous")),  # 1: NORMAL
                await conn.scalar(text("PRAGMA foreign_keys")),
            ]
    finally:
        await store.close()
    assert pragmas == ["wal", 2500, 1, 1]


async def test_a_sqlite_group_write_waits_for_another_writer_then_says_unavailable(
    tmp_path: Path, sqlite_template: Path
) -> None:
    """The group write (its own connection, see inferd.jobs.lite) waits for another process's
    write lock for the busy timeout, then fails as StoreUnavailable, having written nothing."""
    path = tmp_path / "inferd.db"
    shutil.copyfile(sqlite_template, path)
    store = await SqlStore.connect(sqlite_url(path), busy_timeout=0.3)
    try:
        request_id = await submit(store)
        lease = await claim(store)
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # another process's writer
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as info:
                await store.write([JobWrite(lease, ({"response": "x"},), done=True, result=1)])
            assert time.monotonic() - started >= 0.25 and info.value.status_code == 503
        finally:
            other.execute("ROLLBACK")
            other.close()
        assert (await fetch(store, request_id)).status is RequestStatus.RUNNING
        (written,) = await store.write([JobWrite(lease, ({"response": "x"},), done=True)])
        assert written is not None and [e.seq for e in written] == [3, 4]
        assert (await fetch(store, request_id)).status is RequestStatus.SUCCEEDED
    finally:
        await store.close()


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_database_down_is_store_unavailable() -> None:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{_closed_port()}/inferd"
    store = SqlStore(url, connect_timeout=2)
    calls: list[Callable[[], Any]] = [
        lambda: store.create(user="a", model="m", input=1, parameters={}),
        lambda: store.get("req_01ARZ3NDEKTSV4RRFFQ69G5FAV", "a"),
        lambda: store.page("a"),
        lambda: store.events("req_01ARZ3NDEKTSV4RRFFQ69G5FAV"),
        lambda: store.cancel("req_01ARZ3NDEKTSV4RRFFQ69G5FAV", "a"),
        lambda: store.claim("w", 30),
        lambda: store.counts(),
    ]
    try:
        for call in calls:
            with pytest.raises(StoreUnavailable) as info:
                await call()
            assert info.value.status_code == 503 and info.value.retryable
    finally:
        await store.close()
    with pytest.raises(StoreUnavailable):
        await SqlStore.connect(url, connect_timeout=2)
    with pytest.raises(StoreUnavailable):
        await migrate(url)
