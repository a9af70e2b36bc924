"""SSE frames, Last-Event-ID, and following a request over the in-process event bus."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import orjson
import pytest

from inferd.errors import BadRequest, NotFound
from inferd.http.sse import follow, format_comment, format_event, parse_last_event_id
from inferd.jobs.events import InProcessEventBus, create_event_bus
from inferd.jobs.types import TERMINAL, EventKind, RequestStatus
from tests.support.memory_store import MemoryStore

NOW = datetime(2024, 1, 1, tzinfo=UTC)


def parse(frame: bytes) -> dict[str, Any]:
    """One SSE frame as {field: value}; ``data`` JSON-decoded, comments under ``comment``."""
    assert frame.endswith(b"\n\n")
    fields: dict[str, Any] = {}
    for line in frame[:-2].decode().split("\n"):
        name, _, value = line.partition(": ")
        key = name or "comment"
        fields[key] = f"{fields[key]}\n{value}" if key in fields else value
    if "data" in fields:
        fields["data"] = orjson.loads(fields["data"])
    return fields


async def collect(stream: AsyncIterator[bytes], within: float = 2.0) -> list[dict[str, Any]]:
    async with asyncio.timeout(within):
        return [parse(frame) async for frame in stream]


@pytest.fixture
def store() -> MemoryStore:
    store = MemoryStore()
    store.add("r1")
    return store


@pytest.fixture
async def bus() -> AsyncIterator[InProcessEventBus]:
    bus = InProcessEventBus()
    yield bus
    await bus.close()


# --- frames ----------------------------------------------------------------------------------


def test_event_frame_has_id_event_retry_and_data() -> None:
    frame = format_event(3, "response", {"a": 1}, retry_ms=1000)
    assert frame == b'id: 3\nevent: response\nretry: 1000\ndata: {"a":1}\n\n'
    assert format_event(None, "done", [1, "x"]) == b'event: done\ndata: [1,"x"]\n\n'


def test_multiline_data_becomes_several_data_lines() -> None:
    pretty = orjson.dumps({"a": 1, "b": [2]}, option=orjson.OPT_INDENT_2)
    frame = format_event(1, "response", pretty)
    lines = frame.split(b"\n")
    assert lines[:2] == [b"id: 1", b"event: response"]
    assert all(line.startswith(b"data: ") for line in lines[2:-2]) and len(lines[2:-2]) > 3
    assert parse(frame)["data"] == {"a": 1, "b": [2]}  # a client joins them with \n
    assert format_event(1, "e", b"x\r\ny\rz") == b"id: 1\nevent: e\ndata: x\ndata: y\ndata: z\n\n"
    # JSON escapes the line breaks inside strings: still one line, and the text round-trips.
    assert parse(format_event(1, "e", {"t": "a\nb"}))["data"] == {"t": "a\nb"}


def test_frame_rejects_bad_event_name_and_retry() -> None:
    with pytest.raises(ValueError, match="line break"):
        format_event(1, "a\nb", {})
    with pytest.raises(ValueError, match="retry"):
        format_event(1, "a", {}, retry_ms=-1)


def test_comment_frame() -> None:
    assert format_comment("keep-alive") == b": keep-alive\n\n"
    assert format_comment() == b": keep-alive\n\n"
    assert format_comment("hi", retry_ms=500) == b"retry: 500\n: hi\n\n"


@pytest.mark.parametrize(
    ("value", "expected"), [(None, 0), ("", 0), ("0", 0), ("42", 42), (" 7 ", 7)]
)
def test_last_event_id_accepted(value: str | None, expected: int) -> None:
    assert parse_last_event_id(value) == expected


@pytest.mark.parametrize("value", ["-1", "abc", "1.5", "1e3", "+3", "\u00b2", "9" * 20, "1 2"])
def test_last_event_id_rejected(value: str) -> None:
    with pytest.raises(BadRequest, match="Last-Event-ID") as info:
        parse_last_event_id(value)
    assert info.value.status_code == 400


# --- following -------------------------------------------------------------------------------


async def test_replay_then_live_events(store: MemoryStore, bus: InProcessEventBus) -> None:
    store.push("r1", EventKind.STATUS)
    store.push("r1", EventKind.RESPONSE)
    frames = asyncio.create_task(collect(follow(store, bus, "r1", poll=5)))
    await asyncio.sleep(0.01)
    for kind in (EventKind.RESPONSE, EventKind.DONE):
        await bus.publish("r1", store.push("r1", kind))
    got = await frames
    assert [(f["id"], f["event"]) for f in got] == [
        ("1", "status"), ("2", "response"), ("3", "response"), ("4", "done"),
    ]  # fmt: skip
    assert got[0]["retry"] == "1000" and all("retry" not in f for f in got[1:])
    assert got[2]["data"] == {"n": 3}
    assert bus.subscriber_count() == 0


async def test_resume_after_last_event_id(store: MemoryStore, bus: InProcessEventBus) -> None:
    for _ in range(4):
        store.push("r1", EventKind.RESPONSE)
    store.push("r1", EventKind.DONE)
    got = await collect(follow(store, bus, "r1", after=3))
    assert [f["id"] for f in got] == ["4", "5"]


async def test_no_duplicates_when_replayed_and_published(
    store: MemoryStore, bus: InProcessEventBus
) -> None:
    store.push("r1", EventKind.RESPONSE)
    stream = follow(store, bus, "r1", poll=5)
    first = await anext(stream)  # replayed; now announce it as well, late
    reads = store.event_reads
    await bus.publish("r1", 1)
    await asyncio.sleep(0.01)
    assert store.event_reads == reads  # an already-sent seq does not even cost a read
    await bus.publish("r1", store.push("r1", EventKind.RESPONSE))
    await bus.publish("r1", 2)
    await bus.publish("r1", store.push("r1", EventKind.DONE))
    rest = await collect(stream)
    assert [parse(first)["id"]] + [f["id"] for f in rest] == ["1", "2", "3"]


async def test_missed_publish_is_delivered_by_polling(
    store: MemoryStore, bus: InProcessEventBus
) -> None:
    stream = follow(store, bus, "r1", poll=0.05, keepalive=10)
    pending = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.01)
    store.push("r1", EventKind.RESPONSE)  # stored, never published
    async with asyncio.timeout(0.5):
        assert parse(await pending)["id"] == "1"
    await stream.aclose()
    assert bus.subscriber_count() == 0


async def test_keepalive_when_idle(store: MemoryStore, bus: InProcessEventBus) -> None:
    stream = follow(store, bus, "r1", keepalive=0.03, poll=0.02, retry_ms=250)
    async with asyncio.timeout(1):
        first, second = await anext(stream), await anext(stream)
    assert first == b"retry: 250\n: keep-alive\n\n"  # the first frame carries retry
    assert second == b": keep-alive\n\n"
    await bus.publish("r1", store.push("r1", EventKind.DONE))
    got = await collect(stream)
    assert [f.get("event") for f in got if "comment" not in f] == ["done"]
    assert "retry" not in got[-1]


async def test_terminal_request_fully_sent_ends_at_once(
    store: MemoryStore, bus: InProcessEventBus
) -> None:
    store.push("r1", EventKind.RESPONSE)
    store.push("r1", EventKind.ERROR, {"status": "failed", "error": "boom"})
    assert store.records["r1"].status in TERMINAL
    got = await collect(follow(store, bus, "r1", poll=5, keepalive=5), within=0.5)
    assert [f["event"] for f in got] == ["response", "error"]
    assert await collect(follow(store, bus, "r1", after=2, poll=5), within=0.5) == []


async def test_ends_when_request_turns_terminal_without_terminal_event(
    store: MemoryStore, bus: InProcessEventBus
) -> None:
    store.push("r1", EventKind.RESPONSE)
    frames = asyncio.create_task(collect(follow(store, bus, "r1", poll=0.02)))
    await asyncio.sleep(0.01)
    store.set_status("r1", RequestStatus.CANCELLED)
    assert [f["id"] for f in await frames] == ["1"]


async def test_unknown_request_raises_not_found(store: MemoryStore, bus: InProcessEventBus) -> None:
    with pytest.raises(NotFound):
        await anext(follow(store, bus, "nope"))
    with pytest.raises(NotFound):
        await anext(follow(store, bus, "r1", user="mallory"))
    assert bus.subscriber_count() == 0


async def test_consumer_stopping_early_unsubscribes(
    store: MemoryStore, bus: InProcessEventBus
) -> None:
    store.push("r1", EventKind.RESPONSE)
    stream = follow(store, bus, "r1", poll=5)
    await anext(stream)
    waiting = asyncio.ensure_future(anext(stream))  # parked on the bus
    await asyncio.sleep(0.01)
    assert bus.subscriber_count("r1") == 1
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await stream.aclose()
    assert bus.subscriber_count() == 0


async def test_follow_survives_bus_closing(store: MemoryStore, bus: InProcessEventBus) -> None:
    frames = asyncio.create_task(collect(follow(store, bus, "r1", poll=0.03)))
    await asyncio.sleep(0.01)
    await bus.close()  # subscriptions end: the follower polls the store instead
    store.push("r1", EventKind.RESPONSE)
    store.push("r1", EventKind.DONE)
    assert [f["id"] for f in await frames] == ["1", "2"]


async def test_follow_with_async_generator_subscription(store: MemoryStore) -> None:
    inner = InProcessEventBus()

    class GeneratorBus:
        async def publish(self, request_id: str, seq: int) -> None:
            await inner.publish(request_id, seq)

        async def subscribe(self, request_id: str) -> AsyncIterator[int]:
            sub = inner.subscribe(request_id)
            try:
                async for seq in sub:
                    yield seq
            finally:
                await sub.aclose()

        async def close(self) -> None:
            await inner.close()

    bus = GeneratorBus()
    stream = follow(store, bus, "r1", poll=5, keepalive=0.05)
    waiting = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.01)
    await bus.publish("r1", store.push("r1", EventKind.RESPONSE))
    assert parse(await waiting)["id"] == "1"
    async with asyncio.timeout(1):
        assert await anext(stream) == b": keep-alive\n\n"  # its anext of the bus is pending
    assert inner.subscriber_count() == 1
    await stream.aclose()  # must not trip over the generator's running anext
    assert inner.subscriber_count() == 0


async def test_long_backlog_is_read_in_pages(store: MemoryStore, bus: InProcessEventBus) -> None:
    for _ in range(2500):
        store.push("r1", EventKind.RESPONSE)
    store.push("r1", EventKind.DONE)
    got = await collect(follow(store, bus, "r1"))
    assert [int(f["id"]) for f in got] == list(range(1, 2502))


# --- the in-process bus ----------------------------------------------------------------------


async def test_lagging_subscriber_keeps_only_the_latest(bus: InProcessEventBus) -> None:
    sub = bus.subscribe("r1")
    for seq in (1, 2, 5, 3):
        await bus.publish("r1", seq)
    async with asyncio.timeout(1):
        assert await anext(sub) == 5
    await bus.publish("r1", 6)
    async with asyncio.timeout(1):
        assert await anext(sub) == 6
    await sub.aclose()
    with pytest.raises(StopAsyncIteration):
        await anext(sub)


async def test_every_subscriber_is_woken(bus: InProcessEventBus) -> None:
    subs = [bus.subscribe("r1") for _ in range(3)]
    other = bus.subscribe("r2")
    await bus.publish("r1", 1)
    async with asyncio.timeout(1):
        assert [await anext(s) for s in subs] == [1, 1, 1]
    assert other._slot.latest is None
    assert bus.subscriber_count("r1") == 3 and bus.subscriber_count() == 4


async def test_collected_subscription_leaves_the_bus(bus: InProcessEventBus) -> None:
    sub = bus.subscribe("r1")
    assert bus.subscriber_count("r1") == 1
    del sub
    gc.collect()
    await asyncio.sleep(0)
    assert bus.subscriber_count() == 0 and not bus._slots


async def test_close_ends_subscriptions(bus: InProcessEventBus) -> None:
    sub = bus.subscribe("r1")
    waiting = asyncio.ensure_future(anext(sub))
    await asyncio.sleep(0)
    await bus.close()
    with pytest.raises(StopAsyncIteration):
        await waiting
    with pytest.raises(StopAsyncIteration):
        await anext(bus.subscribe("r1"))  # subscribing to a closed bus ends at once


async def test_an_announcement_wakes_one_idle_worker(bus: InProcessEventBus) -> None:
    waiters = [asyncio.ensure_future(bus.wait_announced(0.3)) for _ in range(3)]
    await asyncio.sleep(0)
    await bus.announce()
    await bus.announce()
    assert sorted(await asyncio.gather(*waiters)) == [False, True, True]  # one each


async def test_an_announcement_waits_for_a_worker(bus: InProcessEventBus) -> None:
    await bus.announce()
    await bus.announce()  # coalesced with the first one
    assert await bus.wait_announced(0.05) is True
    assert await bus.wait_announced(0.05) is False
    assert not bus._idle  # the waiter that timed out left


def test_factory_picks_the_bus() -> None:
    assert isinstance(create_event_bus(None), InProcessEventBus)
    assert isinstance(create_event_bus(""), InProcessEventBus)


# --- events carried by the bus ----------------------------------------------------------------


async def test_events_the_bus_carries_are_not_read_back_from_the_store(
    store: MemoryStore, bus: InProcessEventBus
) -> None:
    stream = follow(store, bus, "r1", poll=5, keepalive=5)
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.01)  # subscribed, and the (empty) history replayed
    reads = store.event_reads
    store.push("r1", EventKind.RESPONSE, {"response": "a"})
    store.push("r1", EventKind.RESPONSE, {"response": "b"})
    await bus.publish_events(store.log["r1"][0:2])
    assert parse(await first)["data"] == {"response": "a"}
    assert parse(await anext(stream))["data"] == {"response": "b"}
    store.push("r1", EventKind.DONE, {"status": "succeeded"})
    await bus.publish_events(store.log["r1"][2:])
    rest = await collect(stream)
    assert [(f["id"], f["event"]) for f in rest] == [("3", "done")]
    assert store.event_reads == reads  # all three came with their announcements


async def test_a_gap_in_what_the_bus_carried_is_read_from_the_store(
    store: MemoryStore, bus: InProcessEventBus
) -> None:
    stream = follow(store, bus, "r1", poll=5, keepalive=5)
    first = asyncio.ensure_future(anext(stream))
    await asyncio.sleep(0.01)
    reads = store.event_reads
    store.push("r1", EventKind.RESPONSE, {"response": "a"})
    await bus.publish("r1", 1)  # announced without the event (a seq-only publisher)
    assert parse(await first)["data"] == {"response": "a"}
    assert store.event_reads == reads + 1
    store.push("r1", EventKind.RESPONSE, {"response": "b"})
    store.push("r1", EventKind.DONE, {"status": "succeeded"})
    await bus.publish_events(store.log["r1"][2:])  # seq 3 carried, seq 2 not: a gap
    rest = await collect(stream)
    assert [(f["id"], f["event"]) for f in rest] == [("2", "response"), ("3", "done")]
    assert store.event_reads == reads + 2


async def test_a_follower_far_behind_drops_what_the_bus_carried(
    store: MemoryStore, bus: InProcessEventBus
) -> None:
    """A subscription holds a bounded number of carried events for a reader that does not
    take them (a slow client): past the bound it drops them, and the reader reads the store."""
    subscription = bus.subscribe("r1")
    for _ in range(600):
        store.push("r1", EventKind.RESPONSE)
    log = store.log["r1"]
    for event in log[:200]:
        await bus.publish_events([event])
    assert [event.seq for event in subscription.take(0, 200)] == list(range(1, 201))
    for event in log[200:600]:  # 400 more, none taken
        await bus.publish_events([event])
    assert subscription.take(200, 600) == []
    assert subscription.take(200, 600) == []  # and nothing is kept for later
    await subscription.aclose()


async def test_a_subscription_waits_with_a_timeout_in_the_callers_task() -> None:
    """``next_within``: the next seq once published, None after the timeout, the end once
    closed; no task is started for the wait."""
    bus = InProcessEventBus()
    sub = bus.subscribe("r1")
    tasks = len(asyncio.all_tasks())
    assert await sub.next_within(0.01) is None
    assert len(asyncio.all_tasks()) == tasks

    async def publish_soon() -> None:
        await asyncio.sleep(0.01)
        await bus.publish("r1", 3)

    publisher = asyncio.create_task(publish_soon())
    assert await sub.next_within(5) == 3
    await publisher
    await bus.publish("r1", 4)
    await bus.publish("r1", 5)  # while the reader lags, the highest is kept
    assert await sub.next_within(5) == 5
    await sub.aclose()
    with pytest.raises(StopAsyncIteration):
        await sub.next_within(5)
