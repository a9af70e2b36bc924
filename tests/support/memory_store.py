"""An in-memory ``RequestStore`` + ``JobQueue`` for unit tests of the worker, the runner and the
request service: the protocol's semantics (fenced leases, attempts, back-off, cancellation,
idempotency, gap-free event seqs) over dicts, with a clock the test can move.

It is not a third backend: the SQL store is checked against the same semantics by
``tests/integration/test_store_contract.py`` on SQLite and PostgreSQL. Feeding helpers
(:meth:`MemoryStore.add`, :meth:`MemoryStore.push`, :meth:`MemoryStore.set_status`) let a test
write a request's history directly.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from inferd.errors import BadRequest, IdempotencyConflict
from inferd.jobs.ids import new_request_id
from inferd.jobs.rows import body_hash
from inferd.jobs.types import (
    TERMINAL,
    Event,
    EventKind,
    JobWrite,
    Lease,
    Page,
    RequestRecord,
    RequestStatus,
)

__all__ = ["MemoryStore"]

START = datetime(2024, 1, 1, tzinfo=UTC)
CANCELLED_BY_USER = "cancelled by the user"


@dataclass
class _Job:
    run_at: datetime
    running: bool = False
    token: str | None = None
    expires_at: datetime | None = None
    worker: str | None = None


class MemoryStore:
    """Requests, jobs and events in dicts; ``now`` is the store's clock (see :meth:`advance`)."""

    def __init__(self, *, backoff: float = 0.0) -> None:
        self.records: dict[str, RequestRecord] = {}
        self.log: dict[str, list[Event]] = {}
        self.jobs: dict[str, _Job] = {}
        self.digests: dict[str, str] = {}
        self.charges: dict[str, dict[str, Any]] = {}
        self.traces: dict[str, dict[str, str]] = {}
        self.backoff = backoff
        self.now = START
        self.event_reads = 0
        self.writes = 0

    # ------------------------------------------------------------------ test helpers
    def advance(self, seconds: float) -> None:
        """Move the store's clock (lease expiry, back-off)."""
        self.now += timedelta(seconds=seconds)

    def add(
        self,
        request_id: str = "r1",
        user: str = "alice",
        status: RequestStatus = RequestStatus.RUNNING,
        model: str = "m",
    ) -> None:
        """A request with no events and no job, in ``status`` (for readers of the history)."""
        self.records[request_id] = RequestRecord(
            id=request_id, user=user, model=model, version=None, input=None, parameters={},
            status=status, attempts=1, max_attempts=3, result=None, error=None,
            created_at=self.now, updated_at=self.now, started_at=self.now, finished_at=None,
            cancel_requested=False, idempotency_key=None, last_seq=0,
        )  # fmt: skip
        self.log[request_id] = []

    def push(self, request_id: str, kind: EventKind, data: dict[str, Any] | None = None) -> int:
        """Store one event directly (a ``done``/``error`` one ends the request); its seq."""
        seq = len(self.log[request_id]) + 1
        record = self.records[request_id]
        self.log[request_id].append(
            Event(request_id, seq, kind, data or {"n": seq}, record.attempts, self.now)
        )
        status = {EventKind.DONE: RequestStatus.SUCCEEDED, EventKind.ERROR: RequestStatus.FAILED}
        self.set_status(request_id, status.get(kind, record.status), seq)
        return seq

    def set_status(
        self, request_id: str, status: RequestStatus, last_seq: int | None = None
    ) -> None:
        record = self.records[request_id]
        seq = record.last_seq if last_seq is None else last_seq
        self.records[request_id] = dataclasses.replace(record, status=status, last_seq=seq)

    def kinds(self, request_id: str) -> list[str]:
        """The kinds of a request's stored events, in order."""
        return [str(e.kind) for e in self.log[request_id]]

    # ------------------------------------------------------------------ RequestStore
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
    ) -> tuple[RequestRecord, bool]:
        if max_attempts < 1:
            raise BadRequest("max_attempts must be at least 1")
        if idempotency_key is not None:
            existing = await self.replayed(user, idempotency_key, model, input, parameters)
            if existing is not None:
                return existing, False
        self.writes += 1
        request_id = new_request_id(int(self.now.timestamp() * 1000))
        self.records[request_id] = RequestRecord(
            id=request_id, user=user, model=model, version=version, input=input,
            parameters=parameters, status=RequestStatus.QUEUED, attempts=0,
            max_attempts=max_attempts, result=None, error=None, created_at=self.now,
            updated_at=self.now, started_at=None, finished_at=None, cancel_requested=False,
            idempotency_key=idempotency_key, last_seq=0,
        )  # fmt: skip
        self.log[request_id] = []
        self.digests[request_id] = body_hash(model, None, input, parameters)
        self.jobs[request_id] = _Job(run_at=self.now)
        if charge is not None:
            self.charges[request_id] = charge
        if trace_context is not None:
            self.traces[request_id] = trace_context
        self._emit(request_id, EventKind.STATUS, {"status": "queued", "attempt": 0})
        return self._record(request_id), True

    async def replayed(
        self, user: str, key: str, model: str, input: Any, parameters: dict[str, Any]
    ) -> RequestRecord | None:
        for request_id, record in self.records.items():
            if record.user == user and record.idempotency_key == key:
                if self.digests[request_id] != body_hash(model, None, input, parameters):
                    raise IdempotencyConflict(
                        f"the Idempotency-Key {key!r} was already used with a different body"
                    )
                return self._record(request_id)
        return None

    async def get(self, request_id: str, user: str | None = None) -> RequestRecord | None:
        record = self.records.get(request_id)
        if record is None or (user is not None and record.user != user):
            return None
        return self._record(request_id)

    async def page(self, user: str, cursor: str | None = None, limit: int = 20) -> Page:
        if not 1 <= limit <= 100:
            raise BadRequest(f"limit must be between 1 and 100, not {limit}")
        mine = sorted(
            (r for r in self.records.values() if r.user == user),
            key=lambda r: (r.created_at, r.id),
            reverse=True,
        )
        if cursor is not None:
            ids = [r.id for r in mine]
            if cursor not in ids:
                raise BadRequest(f"malformed cursor {cursor!r}")
            mine = mine[ids.index(cursor) + 1 :]
        items = [self._record(r.id) for r in mine[:limit]]
        more = len(mine) > limit
        return Page(items, items[-1].id if more else None)

    async def events(self, request_id: str, after: int = 0, limit: int = 1000) -> list[Event]:
        self.event_reads += 1
        return [e for e in self.log.get(request_id, []) if e.seq > after][: max(1, limit)]

    async def cancel(self, request_id: str, user: str | None = None) -> RequestRecord | None:
        record = await self.get(request_id, user)
        if record is None:
            return None
        if record.status is RequestStatus.QUEUED:
            self._cancelled(request_id)
        elif record.status is RequestStatus.RUNNING and not record.cancel_requested:
            self._update(request_id, cancel_requested=True)
        return self._record(request_id)

    # ------------------------------------------------------------------ JobQueue
    async def claim(
        self, worker_id: str, lease_seconds: float, models: list[str] | None = None
    ) -> Lease | None:
        if lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        await self.reap_expired()
        due = sorted(
            (job.run_at, request_id)
            for request_id, job in self.jobs.items()
            if not job.running
            and job.run_at <= self.now
            and (models is None or self.records[request_id].model in models)
        )
        if not due:
            return None
        request_id = due[0][1]
        job = self.jobs[request_id]
        job.running, job.worker = True, worker_id
        job.token = secrets.token_urlsafe(8)
        job.expires_at = self.now + timedelta(seconds=lease_seconds)
        record = self.records[request_id]
        attempts = record.attempts + 1
        self._update(
            request_id,
            status=RequestStatus.RUNNING,
            attempts=attempts,
            started_at=record.started_at or self.now,
        )
        self._emit(request_id, EventKind.STATUS, {"status": "running", "attempt": attempts})
        return Lease(
            request_id=request_id,
            token=job.token,
            attempt=attempts,
            expires_at=job.expires_at,
            model=record.model,
            input=record.input,
            parameters=record.parameters,
            trace_context=self.traces.get(request_id),
        )

    async def claim_many(
        self, worker_id: str, lease_seconds: float, limit: int, models: list[str] | None = None
    ) -> list[Lease]:
        leases: list[Lease] = []
        while len(leases) < limit:
            lease = await self.claim(worker_id, lease_seconds, models)
            if lease is None:
                break
            leases.append(lease)
        return leases

    async def write(self, writes: Sequence[JobWrite]) -> list[list[Event] | None]:
        ids = [w.lease.request_id for w in writes]
        if len(set(ids)) != len(ids):
            raise ValueError("at most one write per lease in a batch")
        results: list[list[Event] | None] = []
        for w in writes:
            if self._held(w.lease) is None:
                results.append(None)
                continue
            rid = w.lease.request_id
            sent = {"sent_at": self.now.isoformat()}
            stored = [self._emit(rid, EventKind.RESPONSE, sent | data) for data in w.responses]
            if w.done:
                data = {"status": "succeeded", "result": w.result}
                stored.append(self._finish(rid, EventKind.DONE, data, result=w.result))
            results.append(stored)
        return results

    async def heartbeat(self, lease: Lease, lease_seconds: float) -> bool:
        job = self._held(lease)
        if job is None:
            return False
        job.expires_at = self.now + timedelta(seconds=lease_seconds)
        return not self.records[lease.request_id].cancel_requested

    async def append(self, lease: Lease, data: dict[str, Any]) -> Event | None:
        if self._held(lease) is None:
            return None
        payload = {"sent_at": self.now.isoformat()} | data
        return self._emit(lease.request_id, EventKind.RESPONSE, payload)

    async def complete(self, lease: Lease, result: Any) -> Event | None:
        if self._held(lease) is None:
            return None
        data = {"status": "succeeded", "result": result}
        return self._finish(lease.request_id, EventKind.DONE, data, result=result)

    async def fail(self, lease: Lease, error: str, retryable: bool = True) -> Event | None:
        if self._held(lease) is None:
            return None
        record = self.records[lease.request_id]
        if not retryable or record.attempts >= record.max_attempts:
            status = RequestStatus.FAILED if not retryable else RequestStatus.DEAD
            data = {"status": status.value, "error": error}
            return self._finish(lease.request_id, EventKind.ERROR, data, error=error)
        if record.cancel_requested:
            return self._cancelled(lease.request_id)
        return self._requeue(lease.request_id, self.backoff, error, error=error)

    async def release(self, lease: Lease) -> bool:
        if self._held(lease) is None:
            return False
        record = self.records[lease.request_id]
        if record.cancel_requested:
            self._cancelled(lease.request_id)
        else:
            self._update(lease.request_id, attempts=record.attempts - 1)
            self._requeue(lease.request_id, 0.0, "worker shut down")
        return True

    async def finish_cancelled(self, lease: Lease) -> Event | None:
        if self._held(lease) is None:
            return None
        return self._cancelled(lease.request_id)

    async def reap_expired(self) -> int:
        expired = [
            request_id
            for request_id, job in self.jobs.items()
            if job.running and job.expires_at is not None and job.expires_at <= self.now
        ]
        for request_id in expired:
            record = self.records[request_id]
            if record.cancel_requested:
                self._cancelled(request_id)
            elif record.attempts >= record.max_attempts:
                error = "lease expired on the last attempt"
                data = {"status": "dead", "error": error}
                self._finish(request_id, EventKind.ERROR, data, error=error)
            else:
                self._requeue(request_id, 0.0, "lease expired")
        return len(expired)

    async def counts(self) -> dict[str, int]:
        counts = {status.value: 0 for status in RequestStatus}
        for record in self.records.values():
            counts[record.status.value] += 1
        return counts

    # ------------------------------------------------------------------ internals
    def _record(self, request_id: str) -> RequestRecord:
        record = self.records[request_id]
        responses = [
            {"response": e.data.get("response"), "sent_at": e.data.get("sent_at")}
            for e in self.log[request_id]
            if e.kind is EventKind.RESPONSE and e.attempt == record.attempts
        ]
        return dataclasses.replace(record, responses=responses)

    def _held(self, lease: Lease) -> _Job | None:
        job = self.jobs.get(lease.request_id)
        if (
            job is None
            or not job.running
            or job.token != lease.token
            or job.expires_at is None
            or job.expires_at <= self.now
        ):
            return None
        self.writes += 1
        return job

    def _update(self, request_id: str, **values: Any) -> None:
        record = self.records[request_id]
        self.records[request_id] = dataclasses.replace(record, updated_at=self.now, **values)

    def _emit(self, request_id: str, kind: EventKind, data: dict[str, Any]) -> Event:
        record = self.records[request_id]
        seq = record.last_seq + 1
        event = Event(request_id, seq, kind, data, record.attempts, self.now)
        self.log[request_id].append(event)
        self._update(request_id, last_seq=seq)
        return event

    def _finish(
        self, request_id: str, kind: EventKind, data: dict[str, Any], **values: Any
    ) -> Event:
        self.jobs.pop(request_id, None)
        status = RequestStatus(data["status"])
        assert status in TERMINAL
        self._update(request_id, status=status, finished_at=self.now, **values)
        return self._emit(request_id, kind, data)

    def _cancelled(self, request_id: str) -> Event:
        data = {"status": "cancelled", "error": CANCELLED_BY_USER}
        values = {"error": CANCELLED_BY_USER, "cancel_requested": True}
        return self._finish(request_id, EventKind.ERROR, data, **values)

    def _requeue(self, request_id: str, delay: float, reason: str, **values: Any) -> Event:
        job = self.jobs[request_id]
        job.running, job.token, job.expires_at, job.worker = False, None, None, None
        job.run_at = self.now + timedelta(seconds=delay)
        self._update(request_id, status=RequestStatus.QUEUED, **values)
        attempts = self.records[request_id].attempts
        data: dict[str, Any] = {"status": "queued", "attempt": attempts, "reason": reason}
        if delay > 0:
            data["retry_at"] = job.run_at.isoformat()
        return self._emit(request_id, EventKind.STATUS, data)
