"""A model's queue with priorities and a fair share per tenant.

Requests wait in one FIFO lane per (priority, tenant); a tenant is whoever pays for the
request (an API key, or everyone without one). A batch is filled from the highest priority
that has work, and within a priority by deficit round robin over its tenants (Shreedhar and
Varghese, 1995): each tenant, in turn, may take up to a quantum of rows, plus what it did not
use when its head request was larger, so that one tenant sending ten times its share gets its
share, not the queue. Pushing is O(1); so is taking, per request taken (a request larger than
the quantum takes one visit per quantum).

With one tenant at a priority (the common case) its lane is read in arrival order, as a plain
FIFO queue would be.
"""

from __future__ import annotations

import sys
from collections import deque
from collections.abc import Callable, Iterator
from typing import Generic, Protocol, TypeVar

__all__ = ["HIGH", "LOW", "NORMAL", "PRIORITIES", "FairQueue", "parse_priority"]

PRIORITIES = ("high", "normal", "low")
"""The priority levels, most urgent first; a request's priority is its index here."""
HIGH, NORMAL, LOW = range(3)
_UNLIMITED = sys.maxsize  # the deficit of a tenant alone at its priority


def parse_priority(name: str) -> int:
    """The level named ``name`` (case-insensitive); ValueError for another name."""
    try:
        return PRIORITIES.index(name.strip().lower())
    except ValueError:
        raise ValueError(
            f"priority must be one of {', '.join(PRIORITIES)}, not {name[:40]!r}"
        ) from None


class Queued(Protocol):
    @property
    def rows(self) -> int: ...

    @property
    def enqueued(self) -> float: ...


T = TypeVar("T", bound=Queued)


class _Level(Generic[T]):
    """The lanes of one priority: tenant -> FIFO, in round-robin order (dict order)."""

    __slots__ = ("deficits", "lanes")

    def __init__(self) -> None:
        self.lanes: dict[str, deque[T]] = {}
        self.deficits: dict[str, int] = {}


class FairQueue(Generic[T]):
    """Requests by priority, then by deficit round robin over tenants (see the module)."""

    def __init__(self, quantum: int = 1) -> None:
        if quantum < 1:
            raise ValueError("quantum must be >= 1")
        self.quantum = quantum
        """Rows a tenant may take per turn (a larger head request waits for its turns)."""
        self.depth = 0
        """Requests waiting, all priorities."""
        self.rows = 0
        """Rows waiting, all priorities."""
        self._levels: tuple[_Level[T], ...] = tuple(_Level() for _ in PRIORITIES)
        self._held: dict[str, int] = {}

    def __len__(self) -> int:
        return self.depth

    def __bool__(self) -> bool:
        return self.depth > 0

    @property
    def tenants(self) -> int:
        """Tenants with requests waiting."""
        return len(self._held)

    def held(self, tenant: str) -> int:
        """Requests ``tenant`` has waiting."""
        return self._held.get(tenant, 0)

    def push(self, item: T, tenant: str, priority: int) -> None:
        lanes = self._levels[priority].lanes
        lane = lanes.get(tenant)
        if lane is None:
            lane = lanes[tenant] = deque()
        lane.append(item)
        self.depth += 1
        self.rows += item.rows
        held = self._held
        held[tenant] = held.get(tenant, 0) + 1

    def oldest(self) -> T | None:
        """The request that has waited longest (a look at each lane's head)."""
        best: T | None = None
        for level in self._levels:
            for lane in level.lanes.values():
                head = lane[0]
                if best is None or head.enqueued < best.enqueued:
                    best = head
        return best

    def take(self, max_rows: int, keep: Callable[[T], bool]) -> list[T]:
        """Remove and return the next requests, up to ``max_rows`` rows (one request alone
        when it is larger). Requests ``keep`` refuses (expired, abandoned) are removed too, and
        neither returned nor counted against the batch or their tenant's share."""
        batch: list[T] = []
        room = max_rows
        quantum = self.quantum
        for level in self._levels:
            lanes, deficits = level.lanes, level.deficits
            while lanes:
                if room <= 0:
                    return batch
                tenant = next(iter(lanes))
                lane = lanes[tenant]
                if len(lanes) == 1:  # alone at this priority: arrival order
                    room, _ = self._turn(tenant, lane, room, keep, batch, _UNLIMITED)
                    if not lane:
                        del lanes[tenant]
                        deficits.pop(tenant, None)
                    if room <= 0 or lane:  # full, or the next request is too large for it
                        return batch
                    continue
                deficit = deficits.get(tenant, 0) + quantum
                room, deficit = self._turn(tenant, lane, room, keep, batch, deficit)
                if not lane:  # an emptied lane leaves the round, and its deficit with it
                    del lanes[tenant]
                    deficits.pop(tenant, None)
                    continue
                if lane[0].rows <= deficit:
                    # Stopped by the batch, not by its share: its turn goes on in the next
                    # batch (less the quantum its next visit adds again).
                    deficits[tenant] = deficit - quantum
                    return batch
                deficits[tenant] = deficit  # its turn is over: to the back of the round
                del lanes[tenant]
                lanes[tenant] = lane
        return batch

    def _turn(
        self,
        tenant: str,
        lane: deque[T],
        room: int,
        keep: Callable[[T], bool],
        batch: list[T],
        deficit: int,
    ) -> tuple[int, int]:
        """One tenant's turn: take in arrival order while its deficit and the batch allow;
        (room, deficit) after it."""
        while lane:
            item = lane[0]
            if not keep(item):
                lane.popleft()
                self._gone(tenant, item)
                continue
            if item.rows > deficit or (batch and item.rows > room) or room <= 0:
                break
            lane.popleft()
            self._gone(tenant, item)
            batch.append(item)
            room -= item.rows
            deficit -= item.rows
        return room, deficit

    def _gone(self, tenant: str, item: T) -> None:
        self.depth -= 1
        self.rows -= item.rows
        held = self._held
        left = held[tenant] - 1
        if left:
            held[tenant] = left
        else:
            del held[tenant]

    def drain(self) -> Iterator[T]:
        """Remove every request, most urgent first."""
        for level in self._levels:
            for tenant, lane in list(level.lanes.items()):
                while lane:
                    item = lane.popleft()
                    self._gone(tenant, item)
                    yield item
            level.lanes.clear()
            level.deficits.clear()
