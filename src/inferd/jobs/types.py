"""Long-running requests: the records, the events they emit, and the seams between parts.

A request is accepted by the API (``RequestStore.create``: the record and its job in one
transaction), leased by a worker (``JobQueue.claim``), run by the model's ``stream``, and
every chunk it yields is stored (``JobQueue.append``) before followers are told about it
(``EventBus.publish``). The store is the source of truth; the bus only wakes followers up.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

__all__ = [
    "QUEUED_CHANNEL",
    "TERMINAL",
    "Event",
    "EventBus",
    "EventKind",
    "JobQueue",
    "JobWrite",
    "Lease",
    "Page",
    "QueueControls",
    "QueueLimits",
    "RequestRecord",
    "RequestStatus",
    "RequestStore",
]


class RequestStatus(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    DEAD = "dead"
    EXPIRED = "expired"  # not started before its ``expires_at``


TERMINAL = frozenset(
    {
        RequestStatus.SUCCEEDED,
        RequestStatus.FAILED,
        RequestStatus.CANCELLED,
        RequestStatus.DEAD,
        RequestStatus.EXPIRED,
    }
)


class EventKind(enum.StrEnum):
    RESPONSE = "response"  # a chunk the model produced: data = {"response": ..., "sent_at": ...}
    STATUS = "status"  # a status change: data = {"status": ..., "attempt": ..., "reason"?: ...}
    DONE = "done"  # terminal success: data = {"status": "succeeded", "result": ...}
    ERROR = "error"  # terminal failure: data = {"status": "failed"|"dead"|"cancelled"|"expired",
    # "error"}


@dataclass(frozen=True, slots=True)
class Event:
    """One stored event of a request. ``seq`` starts at 1 and has no gaps per request; it is
    the SSE ``id:`` and what ``Last-Event-ID`` resumes after."""

    request_id: str
    seq: int
    kind: EventKind
    data: dict[str, Any]
    attempt: int
    created_at: datetime


@dataclass(frozen=True, slots=True)
class RequestRecord:
    """A request as stored. ``responses`` are the ``response`` events of the latest attempt,
    as ``{"response": ..., "sent_at": ISO-8601}``, oldest first.

    ``expires_at``: the last instant an attempt may start (None: never expires).
    ``deduplicated_from``: the request whose run this one joined, or whose stored result
    answered it (models with ``[jobs] dedup``); None for a request that ran itself."""

    id: str
    user: str
    model: str
    version: str | None
    input: Any
    parameters: dict[str, Any]
    status: RequestStatus
    attempts: int
    max_attempts: int
    result: Any
    error: str | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    cancel_requested: bool
    idempotency_key: str | None
    last_seq: int
    responses: list[dict[str, Any]] = field(default_factory=list)
    expires_at: datetime | None = None
    deduplicated_from: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def deduplicated(self) -> bool:
        return self.deduplicated_from is not None


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a user's requests, newest first; ``next_cursor`` None on the last page."""

    items: list[RequestRecord]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class Lease:
    """A worker's claim on one request's job. Every write made with it is fenced by ``token``:
    once the lease has expired and been taken by another worker (or the request cancelled),
    writes with the old token change nothing."""

    request_id: str
    token: str
    attempt: int
    expires_at: datetime
    model: str
    input: Any
    parameters: dict[str, Any]
    trace_context: dict[str, str] | None = None
    """The submit's W3C trace context (``traceparent``, ``tracestate``), if it was traced."""
    charged: bool = True
    """Whether the request reserved budget that its end must settle (False: nothing to
    settle, no need to look); a store that cannot tell says True."""


@dataclass(frozen=True, slots=True)
class QueueLimits:
    """What a submit may add to the queue: at most ``max_queued`` queued requests per model
    (past it: :class:`~inferd.errors.QueueFull`, 503) and ``max_queued_per_key`` per API key
    ``key_id`` (:class:`~inferd.errors.TooManyQueued`, 429); None: no bound. Both refusals
    carry ``Retry-After: retry_after``."""

    max_queued: int | None = None
    max_queued_per_key: int | None = None
    key_id: str | None = None
    retry_after: float = 1.0


@dataclass(frozen=True, slots=True)
class JobWrite:
    """What a worker writes for one lease in a batch (:meth:`JobQueue.write`): ``response``
    events with these data (``sent_at`` added when missing), then, if ``done``, the request
    succeeds with ``result`` (its ``done`` event)."""

    lease: Lease
    responses: tuple[dict[str, Any], ...] = ()
    done: bool = False
    result: Any = None


class RequestStore(Protocol):
    """The API's side: create, read, list, cancel, replay events."""

    async def create(
        self,
        *,
        user: str,
        model: str,
        input: Any,
        parameters: dict[str, Any],
        idempotency_key: str | None = None,
        max_attempts: int = 3,
        version: str | None = None,
        charge: dict[str, Any] | None = None,
        trace_context: dict[str, str] | None = None,
        expires_at: float | None = None,
        ttl_seconds: float | None = None,
        limits: QueueLimits | None = None,
        dedup_seconds: float | None = None,
    ) -> tuple[RequestRecord, bool]:
        """Store the request and its job in one transaction. Returns (record, created).
        ``trace_context``: the submit's trace, handed to the worker with the lease.

        With an ``idempotency_key`` already used by ``user``: the same model, input and
        parameters return the existing record with ``created`` False; different ones raise
        :class:`inferd.errors.IdempotencyConflict` (409).

        ``expires_at`` (epoch seconds) or ``ttl_seconds`` (from now): the last instant an
        attempt may start. ``limits``: the bounds of the queue, checked in the transaction.
        ``dedup_seconds``: deduplicate against identical requests (same model, version,
        input and parameters): one that succeeded within that many seconds answers at once,
        one queued or running is joined (no job is added)."""

    async def replayed(
        self, user: str, key: str, model: str, input: Any, parameters: dict[str, Any]
    ) -> RequestRecord | None:
        """The request already stored under idempotency ``key`` for this same body, or None;
        IdempotencyConflict (409) if the key was used with another body."""

    async def get(self, request_id: str, user: str | None = None) -> RequestRecord | None:
        """The record, or None if it does not exist (or belongs to another user)."""

    async def page(self, user: str, cursor: str | None = None, limit: int = 20) -> Page:
        """The user's requests, newest first. The cursor is opaque, stable under concurrent
        inserts (keyset on created_at and id); a malformed cursor raises BadRequest (400)."""

    async def events(self, request_id: str, after: int = 0, limit: int = 1000) -> list[Event]:
        """Stored events with ``seq > after``, in order."""

    async def cancel(self, request_id: str, user: str | None = None) -> RequestRecord | None:
        """Cancel: a queued request becomes ``cancelled`` at once (its job never runs); a
        running one gets ``cancel_requested`` and its worker stops at its next heartbeat or
        chunk. Terminal requests are returned unchanged. None if not found."""


class QueueControls(Protocol):
    """Expiry, deduplicated requests, dead letters and retention: what the maintenance loop
    and the admin API call."""

    async def expire_due(self, limit: int = 100) -> list[tuple[str, Event]]:
        """End queued requests whose ``expires_at`` has passed as ``expired`` (an ``error``
        event each); returns (model, event) of each, at most ``limit``."""

    async def settle_joined(self, limit: int = 100) -> list[Event]:
        """Finish the requests that joined a request which has ended: with its result and
        responses when it succeeded, its error when it failed; as requests of their own
        (queued) when it was cancelled or expired. Returns the events stored."""

    async def purge(self, older_than_seconds: float, limit: int = 500) -> int:
        """Delete up to ``limit`` terminal requests (their events with them) that finished
        more than ``older_than_seconds`` ago; returns how many."""

    async def dead_letters(
        self,
        statuses: list[RequestStatus],
        model: str | None = None,
        cursor: str | None = None,
        limit: int = 20,
    ) -> Page:
        """Every user's requests in ``statuses`` (of ``model``), newest first."""

    async def requeue(self, request_id: str, attempts: int) -> tuple[RequestRecord, Event] | None:
        """Queue a ``dead``, ``failed`` or ``expired`` request again with ``attempts`` more
        attempts (a ``status`` event); None if it does not exist,
        :class:`~inferd.errors.InvalidState` (409) in any other status."""


class JobQueue(Protocol):
    """The workers' side: lease, heartbeat, write chunks, finish. All writes are fenced."""

    async def claim(
        self, worker_id: str, lease_seconds: float, models: list[str] | None = None
    ) -> Lease | None:
        """Atomically take the oldest runnable job (queued, ``run_at`` due) and mark the
        request running; None when there is none. Expired leases are taken back first."""

    async def claim_many(
        self, worker_id: str, lease_seconds: float, limit: int, models: list[str] | None = None
    ) -> list[Lease]:
        """Like :meth:`claim`, for up to ``limit`` jobs in one transaction (oldest first)."""

    async def heartbeat(self, lease: Lease, lease_seconds: float) -> bool:
        """Extend the lease. False if it was lost or the request was cancelled: stop."""

    async def write(self, writes: list[JobWrite]) -> list[list[Event] | None]:
        """Apply the writes of several leases (at most one each) in one transaction, each
        fenced on its own lease: per write, the events stored, or None if its lease was lost
        (then nothing of it was written)."""

    async def append(self, lease: Lease, data: dict[str, Any]) -> Event | None:
        """Store one ``response`` event; None (nothing written) if the lease was lost."""

    async def complete(self, lease: Lease, result: Any) -> Event | None:
        """Mark succeeded with ``result`` and store the ``done`` event; None if lease lost."""

    async def fail(self, lease: Lease, error: str, retryable: bool = True) -> Event | None:
        """Record a failed attempt: requeue with exponential backoff and jitter if retryable
        and attempts remain (a ``status`` event), else ``failed`` (not retryable) or ``dead``
        (attempts exhausted) with an ``error`` event. None if the lease was lost."""

    async def release(self, lease: Lease) -> bool:
        """Give the job back without burning an attempt (graceful worker shutdown)."""

    async def finish_cancelled(self, lease: Lease) -> Event | None:
        """The worker stopped a cancelled request: mark it ``cancelled`` (``error`` event)."""

    async def reap_expired(self) -> int:
        """Requeue jobs whose lease expired (or mark them dead when out of attempts)."""

    async def counts(self) -> dict[str, int]:
        """Number of requests per status (for metrics and autoscaling)."""


QUEUED_CHANNEL = "_queued"
"""The name (in place of a request id) under which a bus keeps its announcements of queued
requests (:meth:`EventBus.announce`)."""


class EventBus(Protocol):
    """Wakes SSE followers when a request has new events; may drop messages (the store is the
    source of truth, followers re-read it)."""

    async def publish(self, request_id: str, seq: int) -> None:
        """Say that ``request_id`` has events up to ``seq``."""

    async def publish_many(self, items: Sequence[tuple[str, int]]) -> None:
        """:meth:`publish` each (request id, seq), at once where the bus can."""

    async def publish_events(self, events: Sequence[Event]) -> None:
        """Publish stored events themselves (each request's in seq order), at once where the
        bus can: at least a :meth:`publish` of each request's last seq; a bus that carries
        them lets followers deliver them without reading the store."""

    def subscribe(self, request_id: str) -> AsyncIterator[int]:
        """Yield the ``seq`` of each publish for ``request_id`` until the iterator is closed."""

    async def announce(self) -> None:
        """Requests were queued: wake one idle worker (of any process), or, if none waits,
        the next one to wait. Announcements coalesce; never raises."""

    async def wait_announced(self, seconds: float) -> bool:
        """Wait at most ``seconds`` to take an announcement; whether one was taken."""

    async def close(self) -> None:
        """Release connections."""
