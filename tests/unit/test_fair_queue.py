"""The queue behind each batcher: priorities first, then deficit round robin over tenants."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest

from inferd.batching import HIGH, LOW, NORMAL, FairQueue, parse_priority


@dataclass
class Item:
    name: str
    rows: int = 1
    enqueued: float = 0.0
    alive: bool = True


def keep(item: Item) -> bool:
    return item.alive


def names(batch: list[Item]) -> list[str]:
    return [item.name for item in batch]


def test_one_tenant_is_served_in_arrival_order_in_batches_of_the_rows_allowed() -> None:
    queue: FairQueue[Item] = FairQueue(quantum=2)
    for i in range(10):
        queue.push(Item(f"a{i}", rows=1 + i % 2), "a", NORMAL)
    assert (queue.depth, queue.rows, queue.tenants, queue.held("a")) == (10, 15, 1, 10)
    first = queue.take(4, keep)
    assert names(first) == ["a0", "a1", "a2"]  # 1 + 2 + 1 rows; the next (2 rows) would not fit
    assert names(queue.take(4, keep)) == ["a3", "a4"]  # 2 + 1 rows
    rest = queue.take(100, keep)
    assert names(rest) == ["a5", "a6", "a7", "a8", "a9"]
    assert (queue.depth, queue.rows, queue.tenants, queue.held("a")) == (0, 0, 0, 0)
    assert not queue


def test_a_tenant_ten_times_over_its_share_does_not_push_the_others_back() -> None:
    queue: FairQueue[Item] = FairQueue(quantum=2)
    for i in range(100):
        queue.push(Item(f"heavy{i}"), "heavy", NORMAL)
    for light in ("l1", "l2", "l3", "l4"):
        queue.push(Item(light), light, NORMAL)
    batch = queue.take(8, keep)
    assert {"l1", "l2", "l3", "l4"} <= set(names(batch))  # all in the first batch, not the 13th
    assert len(batch) == 8
    assert queue.tenants == 1 and queue.held("heavy") == 96


def test_rows_are_shared_evenly_between_tenants_with_requests_of_different_sizes() -> None:
    queue: FairQueue[Item] = FairQueue(quantum=4)
    for i in range(200):
        queue.push(Item(f"big{i}", rows=4), "big", NORMAL)
    for i in range(800):
        queue.push(Item(f"small{i}", rows=1), "small", NORMAL)
    served: Counter[str] = Counter()
    for _ in range(50):
        for item in queue.take(16, keep):
            served[item.name.rstrip("0123456789")] += item.rows
    assert served["big"] + served["small"] == 800
    assert abs(served["big"] - served["small"]) <= 8  # one quantum each way at most


def test_higher_priorities_are_batched_first_whatever_their_arrival() -> None:
    queue: FairQueue[Item] = FairQueue(quantum=1)
    queue.push(Item("low"), "a", LOW)
    queue.push(Item("normal"), "a", NORMAL)
    queue.push(Item("high-b"), "b", HIGH)
    queue.push(Item("high-a"), "a", HIGH)
    assert names(queue.take(3, keep)) == ["high-b", "high-a", "normal"]
    assert names(queue.take(3, keep)) == ["low"]


def test_refused_items_leave_the_queue_uncounted_against_the_batch() -> None:
    queue: FairQueue[Item] = FairQueue(quantum=1)
    dead = [Item(f"dead{i}", alive=False) for i in range(3)]
    for item in dead:
        queue.push(item, "a", NORMAL)
    queue.push(Item("b0"), "b", NORMAL)
    queue.push(Item("a-alive"), "a", NORMAL)
    queue.push(Item("b1"), "b", NORMAL)
    assert names(queue.take(3, keep)) == ["a-alive", "b0", "b1"]
    assert (queue.depth, queue.rows, queue.tenants) == (0, 0, 0)
    assert queue.take(3, keep) == []


def test_a_request_larger_than_a_batch_runs_alone() -> None:
    queue: FairQueue[Item] = FairQueue(quantum=2)
    queue.push(Item("huge", rows=50), "a", NORMAL)
    queue.push(Item("b"), "b", NORMAL)
    batches = [names(queue.take(8, keep)) for _ in range(3)]
    assert ["huge"] in batches and ["b"] in batches


def test_a_turn_cut_short_by_a_full_batch_goes_on_in_the_next() -> None:
    queue: FairQueue[Item] = FairQueue(quantum=4)
    for i in range(4):
        queue.push(Item(f"a{i}"), "a", NORMAL)
    for i in range(4):
        queue.push(Item(f"b{i}"), "b", NORMAL)
    assert names(queue.take(2, keep)) == ["a0", "a1"]
    assert names(queue.take(2, keep)) == ["a2", "a3"]  # a's turn was 4 rows
    assert names(queue.take(4, keep)) == ["b0", "b1", "b2", "b3"]


def test_oldest_and_drain() -> None:
    queue: FairQueue[Item] = FairQueue()
    assert queue.oldest() is None
    queue.push(Item("late", enqueued=3.0), "a", HIGH)
    queue.push(Item("early", enqueued=1.0), "b", LOW)
    queue.push(Item("middle", enqueued=2.0), "a", NORMAL)
    oldest = queue.oldest()
    assert oldest is not None and oldest.name == "early"
    assert [item.name for item in queue.drain()] == ["late", "middle", "early"]
    assert (queue.depth, queue.rows, queue.tenants) == (0, 0, 0)


def test_priority_names() -> None:
    assert [parse_priority(n) for n in ("high", "Normal", " low ")] == [HIGH, NORMAL, LOW]
    with pytest.raises(ValueError, match="priority must be one of high, normal, low"):
        parse_priority("urgent")
    with pytest.raises(ValueError, match="quantum"):
        FairQueue(quantum=0)
