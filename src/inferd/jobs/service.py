"""The long-running requests API as plain methods: what the HTTP routes call."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from typing import Any

from inferd.concurrency import run_blocking
from inferd.errors import NotFound, ValidationFailed
from inferd.jobs.follow import follow_events
from inferd.jobs.runner import ModelExecutor
from inferd.jobs.types import QUEUED_CHANNEL, Event, EventBus, Page, RequestRecord, RequestStore
from inferd.tenancy.enforce import Enforcer

__all__ = ["RequestService"]

_MAX_KEY = 255

log = logging.getLogger("inferd.jobs.service")


class RequestService:
    """Submit, read, list, cancel and follow long-running requests."""

    def __init__(
        self,
        store: RequestStore,
        bus: EventBus,
        executor: ModelExecutor,
        *,
        max_attempts: int = 3,
        keepalive: float = 15.0,
        on_submit: Callable[[], None] | None = None,
        enforcer: Enforcer | None = None,
    ) -> None:
        self.store = store
        self.bus = bus
        self.executor = executor
        self.max_attempts = max_attempts
        self.keepalive = keepalive
        self.on_submit = on_submit
        self.enforcer = enforcer
        self._announcing: asyncio.Task[None] | None = None
        self._announce_again = False
        self._announced = 0

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
        unknown = set(body) - {"model", "input", "parameters"}
        if unknown:
            raise ValidationFailed(
                f"unknown field(s) {', '.join(sorted(map(repr, unknown)))}; "
                "expected 'model', 'input' and optionally 'parameters'"
            )
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise ValidationFailed("'model' must be the name of a served model")
        if "input" not in body:
            raise ValidationFailed("missing field 'input'")
        parameters = body.get("parameters") or {}
        if not isinstance(parameters, dict):
            raise ValidationFailed("'parameters' must be an object")
        if idempotency_key is not None and not 0 < len(idempotency_key) <= _MAX_KEY:
            raise ValidationFailed(f"Idempotency-Key must be 1 to {_MAX_KEY} characters")
        # Off the loop: a text model's check tokenizes the prompt.
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
        record, created = await self.store.create(
            user=user,
            model=model,
            version=self.executor.version_of(model),
            input=body["input"],
            parameters=parameters,
            idempotency_key=idempotency_key,
            max_attempts=self.max_attempts,
            charge=charge,
        )
        if created:
            if self.on_submit is not None:
                self.on_submit()
            self._announce()
        if quota is not None and not created and self.enforcer is not None:
            # A replay that raced past the check above: not charged twice.
            await self.enforcer.limiter.settle(key.id, quota.reserved, 0, day=quota.day)
        return record, created

    def _announce(self) -> None:
        """Tell idle workers (of every process, through the bus) that a request is queued.
        Announcements are coalesced: at most one publish is in flight, and the submits that
        come during it share the next one."""
        if self._announcing is not None:
            self._announce_again = True
            return
        self._announcing = asyncio.get_running_loop().create_task(self._announce_loop())

    async def _announce_loop(self) -> None:
        try:
            while True:
                self._announce_again = False
                self._announced += 1
                try:
                    await self.bus.publish(QUEUED_CHANNEL, self._announced)
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

    async def follow(self, user: str, request_id: str, after: int) -> AsyncIterator[Event | None]:
        """The events of a request after seq ``after``, then live ones until its terminal
        event; ``None`` after ``keepalive`` seconds without one (see
        :func:`~inferd.jobs.follow.follow_events`)."""
        await self.get(user, request_id)  # 404 for another user's request, before streaming
        return follow_events(self.store, self.bus, request_id, after, keepalive=self.keepalive)
