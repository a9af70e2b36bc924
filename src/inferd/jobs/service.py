"""The long-running requests API as plain methods: what the HTTP routes call."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Any, Protocol

from inferd import tracing
from inferd.concurrency import run_blocking
from inferd.errors import NotFound, QueueFull, TooManyQueued, ValidationFailed
from inferd.jobs.follow import follow_events
from inferd.jobs.runner import ModelExecutor
from inferd.jobs.types import (
    Event,
    EventBus,
    Page,
    QueueControls,
    QueueLimits,
    RequestRecord,
    RequestStatus,
    RequestStore,
)
from inferd.metrics import Metrics
from inferd.tenancy.enforce import Enforcer

__all__ = ["ControlledStore", "RequestService"]

_MAX_KEY = 255
_FIELDS = ("model", "input", "parameters", "ttl_seconds", "expires_at")
_MAX_TTL = 10 * 366 * 86_400  # ten years: longer is a mistake (and overflows the column)
ANNOUNCE_SPACING = 0.01
"""Seconds between two announcements of queued requests at the most (see
:meth:`RequestService._announce`)."""


class ControlledStore(RequestStore, QueueControls, Protocol):
    """A request store with the queue controls (the SQL store)."""


log = logging.getLogger("inferd.jobs.service")


class RequestService:
    """Submit, read, list, cancel and follow long-running requests."""

    def __init__(
        self,
        store: ControlledStore,
        bus: EventBus,
        executor: ModelExecutor,
        *,
        max_attempts: int = 3,
        keepalive: float = 15.0,
        on_submit: Callable[[], None] | None = None,
        enforcer: Enforcer | None = None,
        max_queued: int | None = None,
        max_queued_per_key: int | None = None,
        ttl_seconds: float | None = None,
        retry_after: float = 1.0,
        metrics: Metrics | None = None,
    ) -> None:
        self.store = store
        self.bus = bus
        self.executor = executor
        self.max_attempts = max_attempts
        self.keepalive = keepalive
        self.on_submit = on_submit
        self.enforcer = enforcer
        self.max_queued = max_queued
        """Queued requests per model past which a submit gets 503 (model.toml may say)."""
        self.max_queued_per_key = max_queued_per_key
        """Queued requests per API key past which a submit gets 429."""
        self.ttl_seconds = ttl_seconds
        """Default wait for a first attempt before a request expires (None: never)."""
        self.retry_after = retry_after
        self.metrics = metrics
        self._announcing: asyncio.Task[None] | None = None
        self._announce_again = False
        self._announced_at = -ANNOUNCE_SPACING  # the loop's time of the last announcement

    async def submit(
        self,
        user: str,
        body: Any,
        idempotency_key: str | None = None,
        key: Any = None,
    ) -> tuple[RequestRecord, bool]:
        """Validate and store a request; returns (record, created)."""
        if not isinstance(body, dict):
            raise ValidationFailed('the body must be a JSON object {"model", "input", ...}')
        unknown = set(body) - set(_FIELDS)
        if unknown:
            raise ValidationFailed(
                f"unknown field(s) {', '.join(sorted(map(repr, unknown)))}; expected 'model', "
                "'input' and optionally 'parameters', 'ttl_seconds' or 'expires_at'"
            )
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ValidationFailed("'model' must be the name of a served model")
        if "input" not in body:
            raise ValidationFailed("missing field 'input'")
        parameters = body.get("parameters")
        if parameters is None:
            parameters = {}
        if not isinstance(parameters, dict):
            raise ValidationFailed("'parameters' must be an object")
        if idempotency_key is not None and not 0 < len(idempotency_key) <= _MAX_KEY:
            raise ValidationFailed(f"Idempotency-Key must be 1 to {_MAX_KEY} characters")
        ttl, expires_at = _deadline(body)
        if self.executor.validates_on_loop(model):  # no thread hop for a few rows
            self.executor.validate(model, body["input"], parameters)
        else:  # off the loop: a text model's check tokenizes the prompt
            await run_blocking(self.executor.validate, model, body["input"], parameters)
        if idempotency_key is not None:
            existing = await self.store.replayed(
                user, idempotency_key, model, body["input"], parameters
            )
            if existing is not None:  # a replay: the same answer, not charged again
                return existing, False
        quota = None
        if key is not None and self.enforcer is not None:
            tokens = self.executor.tokens(model, body["input"], parameters)
            quota = await self.enforcer.charge(key, tokens)
        charge = None
        if quota is not None and quota.reserved:
            charge = {
                "key_id": key.id,
                "user_id": user,
                "day": quota.day,
                "reserved": quota.reserved,
            }
        options = self.executor.jobs_options(model)
        if ttl is None and expires_at is None:
            ttl = options.ttl_seconds if options.ttl_seconds is not None else self.ttl_seconds
        # Only the controls in use are passed: a store without them still takes the rest.
        controls: dict[str, Any] = {}
        if expires_at is not None:
            controls["expires_at"] = expires_at
        if ttl is not None:
            controls["ttl_seconds"] = ttl
        max_queued = options.max_queued_requests or self.max_queued
        if max_queued is not None or self.max_queued_per_key is not None:
            controls["limits"] = QueueLimits(
                max_queued=max_queued,
                max_queued_per_key=self.max_queued_per_key,
                key_id=getattr(key, "id", None),
                retry_after=self.retry_after,
            )
        if options.dedup:
            controls["dedup_seconds"] = options.dedup_ttl_seconds
        try:
            record, created = await self.store.create(
                user=user,
                model=model,
                version=self.executor.version_of(model),
                input=body["input"],
                parameters=parameters,
                idempotency_key=idempotency_key,
                max_attempts=self.max_attempts,
                charge=charge,
                trace_context=tracing.carrier(),  # None while tracing is off
                **controls,
            )
        except (QueueFull, TooManyQueued) as exc:
            if self.metrics is not None:
                self.metrics.job_rejections.labels(model, exc.code).inc()
            if quota is not None and self.enforcer is not None:  # nothing stored: not charged
                await self.enforcer.limiter.settle(key.id, quota.reserved, 0, day=quota.day)
            raise
        if created and record.deduplicated and self.metrics is not None:
            kind = "join" if record.status is RequestStatus.QUEUED else "hit"
            self.metrics.jobs_deduplicated.labels(model, kind).inc()
        if created and not record.deduplicated:
            if self.on_submit is not None:
                self.on_submit()
            self._announce()
        if quota is not None and (not created or record.deduplicated) and self.enforcer:
            # A replay that raced past the check above is not charged twice; a request
            # answered by an identical one runs nothing.
            await self.enforcer.limiter.settle(key.id, quota.reserved, 0, day=quota.day)
        return record, created

    def _announce(self) -> None:
        """Tell an idle worker (of any process, through the bus) that a request is queued.
        Announcements are coalesced: at most one is in flight, and the submits that come
        during it share the next one, sent ``ANNOUNCE_SPACING`` after the last at the
        earliest. A lone submit is announced at once; under a steady flow the workers are
        busy claiming anyway, and an announcement per submit or so (a Redis round trip each)
        cost the API ~5 % of its CPU at 1,000 submits/s. Each announcement is a claim (a
        transaction) by some worker: at 2 ms, four worker processes at 1,000 jobs/s made
        ~250 claims a second of a few jobs each; at 10 ms their CPU per job went from 0.66 ms
        to 0.43-0.55 (bench/README.md), for at most 10 ms more before a job of a steady flow
        starts."""
        if self._announcing is not None:
            self._announce_again = True
            return
        self._announcing = asyncio.get_running_loop().create_task(self._announce_loop())

    async def _announce_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while True:
                wait = self._announced_at + ANNOUNCE_SPACING - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                self._announce_again = False
                self._announced_at = loop.time()
                try:
                    await self.bus.announce()
                except Exception as exc:  # workers poll the queue anyway
                    log.warning("queue announcement failed: %r", exc)
                if not self._announce_again:
                    return
        finally:
            self._announcing = None

    async def get(self, user: str, request_id: str) -> RequestRecord:
        record = await self.store.get(request_id, user)
        if record is None:
            raise NotFound(f"request {request_id!r} does not exist")
        return record

    async def page(self, user: str, cursor: str | None, limit: int) -> Page:
        return await self.store.page(user, cursor, limit)

    async def cancel(self, user: str, request_id: str) -> RequestRecord:
        record = await self.store.cancel(request_id, user)
        if record is None:
            raise NotFound(f"request {request_id!r} does not exist")
        if record.last_seq:
            await self.bus.publish(request_id, record.last_seq)
        return record

    # --- dead letters (the admin API) -------------------------------------------------------

    async def dead_letters(
        self,
        statuses: list[RequestStatus],
        model: str | None,
        cursor: str | None,
        limit: int,
    ) -> Page:
        """Every user's requests in ``statuses`` (dead ones by default), newest first."""
        return await self.store.dead_letters(statuses, model, cursor, limit)

    async def requeue(self, request_id: str, attempts: int | None = None) -> RequestRecord:
        """Queue a dead, failed or expired request again, with ``attempts`` more attempts
        (default: the server's ``max_attempts``)."""
        done = await self.store.requeue(request_id, attempts or self.max_attempts)
        if done is None:
            raise NotFound(f"request {request_id!r} does not exist")
        record, event = done
        await self.bus.publish(request_id, event.seq)
        if self.on_submit is not None:
            self.on_submit()
        return record

    async def follow(self, user: str, request_id: str, after: int) -> AsyncIterator[Event | None]:
        """The events of a request after seq ``after``, then live ones until its terminal
        event; ``None`` after ``keepalive`` seconds without one (see
        :func:`~inferd.jobs.follow.follow_events`)."""
        await self.get(user, request_id)  # 404 for another user's request, before streaming
        return follow_events(self.store, self.bus, request_id, after, keepalive=self.keepalive)


def _deadline(body: dict[str, Any]) -> tuple[float | None, float | None]:
    """(ttl_seconds, expires_at as epoch seconds) of a submit body; 422 when malformed."""
    ttl, expires = body.get("ttl_seconds"), body.get("expires_at")
    if ttl is not None and expires is not None:
        raise ValidationFailed("give 'ttl_seconds' or 'expires_at', not both")
    if ttl is not None:
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl):
            raise ValidationFailed("'ttl_seconds' must be a number of seconds")
        if not 0 < ttl <= _MAX_TTL:
            raise ValidationFailed(f"'ttl_seconds' must be between 0 and {_MAX_TTL}, not {ttl}")
        return float(ttl), None
    if expires is not None:
        if not isinstance(expires, str):
            raise ValidationFailed("'expires_at' must be an ISO-8601 time with a time zone")
        try:
            # RFC 3339 lets the T and the Z be lower case; Python's parser wants them upper.
            when = datetime.fromisoformat(expires.upper())
        except ValueError:
            raise ValidationFailed(
                f"'expires_at' is not an ISO-8601 time: {expires!r} (e.g. 2026-01-31T12:00:00Z)"
            ) from None
        if when.tzinfo is None:
            raise ValidationFailed(
                "'expires_at' needs a time zone (a Z or +00:00 suffix): a time without one "
                "means different instants on client and server"
            )
        return None, when.timestamp()
    return None, None
