"""Workers: lease jobs, run them on the model in a thread, store every chunk, finish fenced.

A worker holds up to ``concurrency`` leases. For each one it runs the model's chunks in a
thread; every chunk is stored (fenced by the lease token) before followers are woken, and a
heartbeat task extends the lease. When a heartbeat is refused (the request was cancelled, or
the lease was lost to another worker) the model is asked to stop between chunks, and whatever
the worker writes afterwards is fenced: a worker that lost its lease changes nothing.

Shutdown is staged: stop claiming, let running jobs finish within the grace period, then stop
them and hand their jobs back to the queue without burning an attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from inferd import tracing
from inferd.concurrency import run_blocking
from inferd.errors import InferdError
from inferd.jobs.runner import ModelExecutor
from inferd.jobs.types import Event, EventBus, EventKind, JobQueue, Lease
from inferd.logs import get_logger

__all__ = ["Worker"]

log = get_logger("inferd.worker")

_STOP_CANCELLED = "cancelled"  # a heartbeat was refused: cancelled, or the lease was lost
_STOP_LOST = "lost"  # a write was refused: the lease belongs to someone else now
_STOP_SHUTDOWN = "shutdown"  # this worker is shutting down past its grace period


@dataclass(eq=False)
class _Job:
    lease: Lease
    stop_reason: str | None = None
    stopped: threading.Event = field(default_factory=threading.Event)
    chunks: list[Any] = field(default_factory=list)
    span: Any = None  # this run's span while tracing is on
    outcome: str = "unrecorded"

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stopped.set()


class Worker:
    """Claims and runs long-running requests until stopped."""

    def __init__(
        self,
        queue: JobQueue,
        bus: EventBus,
        executor: ModelExecutor,
        *,
        concurrency: int = 2,
        lease_seconds: float = 30.0,
        heartbeat_seconds: float = 1.0,
        poll_seconds: float = 0.5,
        models: list[str] | None = None,
        worker_id: str | None = None,
        on_outcome: Callable[[str, str, float], None] | None = None,
        on_terminal: Callable[[Lease, Event, list[Any]], Awaitable[None]] | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        self.queue = queue
        self.bus = bus
        self.executor = executor
        self.concurrency = concurrency
        self.lease_seconds = lease_seconds
        self.heartbeat_seconds = heartbeat_seconds
        self.poll_seconds = poll_seconds
        self.models = models
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.processed = 0
        self.on_outcome = on_outcome
        self.on_terminal = on_terminal
        self._wake = asyncio.Event()
        self._closing = False
        self._jobs: dict[asyncio.Task[None], _Job] = {}

    # ------------------------------------------------------------------ running
    def wake(self) -> None:
        """A job was just queued by this process: look now instead of at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Claim and run jobs until :meth:`stop`."""
        log.info("worker started", worker=self.id, concurrency=self.concurrency)
        while not self._closing:
            if len(self._jobs) >= self.concurrency:
                await asyncio.wait(set(self._jobs), return_when=asyncio.FIRST_COMPLETED)
                continue
            lease = await self._claim()
            if lease is None:
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
                continue
            self._start(lease)

    async def run_burst(self) -> int:
        """Run jobs until none is claimable and none is running; return how many ran."""
        before = self.processed
        while True:
            while len(self._jobs) < self.concurrency and not self._closing:
                lease = await self._claim()
                if lease is None:
                    break
                self._start(lease)
            if not self._jobs:
                return self.processed - before
            await asyncio.wait(set(self._jobs), return_when=asyncio.FIRST_COMPLETED)

    async def stop(self, grace: float = 10.0) -> None:
        """Stop claiming; give running jobs ``grace`` seconds, then hand them back."""
        self._closing = True
        self._wake.set()
        if self._jobs:
            _, pending = await asyncio.wait(set(self._jobs), timeout=grace)
            for task in pending:
                self._jobs[task].stop(_STOP_SHUTDOWN)
            if pending:
                await asyncio.wait(pending)
        log.info("worker stopped", worker=self.id, processed=self.processed)

    async def _claim(self) -> Lease | None:
        try:
            return await self.queue.claim(self.id, self.lease_seconds, self.models)
        except Exception as exc:  # a database hiccup must not kill the worker
            log.warning("claim failed", worker=self.id, detail=repr(exc))
            await asyncio.sleep(self.poll_seconds)
            return None

    def _start(self, lease: Lease) -> None:
        job = _Job(lease)
        task = asyncio.get_running_loop().create_task(
            self._process(job), name=f"job:{lease.request_id}"
        )
        self._jobs[task] = job
        task.add_done_callback(self._finished)

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._jobs.pop(task, None)
        self.processed += 1
        if not task.cancelled() and task.exception() is not None:
            log.error("job task crashed", detail=repr(task.exception()))

    # ------------------------------------------------------------------ one job
    async def _process(self, job: _Job) -> None:
        lease = job.lease
        log.info(
            "job started",
            request_id=lease.request_id,
            model=lease.model,
            attempt=lease.attempt,
            worker=self.id,
        )
        loop = asyncio.get_running_loop()
        heartbeat = loop.create_task(self._heartbeat(job), name=f"heartbeat:{lease.request_id}")
        started = time.perf_counter()
        error: BaseException | None = None
        token = None
        if tracing.tracer is not None:  # a span per run, child of the submit's
            job.span = tracing.job_span(
                lease.trace_context, lease.request_id, lease.model, lease.attempt, self.id
            )
            token = tracing.use_span(job.span)  # the prediction's spans go under it
        try:
            if self.executor.streams(lease.model):
                await run_blocking(self._generate, job, loop)
            else:
                await self._predict(job)
        except Exception as exc:
            error = exc
        finally:
            heartbeat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await heartbeat
            if token is not None:
                tracing.detach(token)
        try:
            # Shielded: the write that records the outcome must not be lost to a cancellation.
            await asyncio.shield(self._settle(job, error, time.perf_counter() - started))
        finally:
            if job.span is not None:
                tracing.end_job_span(job.span, job.outcome, len(job.chunks), error)

    def _generate(self, job: _Job, loop: asyncio.AbstractEventLoop) -> None:
        """Blocking, in a thread: iterate the model's chunks and store each one."""
        lease = job.lease
        chunks = self.executor.chunks(
            lease.model, lease.input, lease.parameters, job.stopped.is_set
        )
        try:
            for chunk in chunks:
                if job.stopped.is_set():
                    return
                stored = asyncio.run_coroutine_threadsafe(self._store(job, chunk), loop).result()
                if not stored:
                    job.stop(_STOP_LOST)
                    return
                job.chunks.append(chunk)
        finally:
            close = getattr(chunks, "close", None)
            if callable(close):
                close()

    async def _predict(self, job: _Job) -> None:
        """A non-streaming model's one chunk, through the model's batcher."""
        lease = job.lease
        chunk = await self.executor.predict(
            lease.request_id, lease.model, lease.input, lease.parameters, job.stopped.is_set
        )
        if job.stopped.is_set():
            return
        if not await self._store(job, chunk):
            job.stop(_STOP_LOST)
            return
        job.chunks.append(chunk)

    async def _store(self, job: _Job, chunk: Any) -> bool:
        event = await self.queue.append(
            job.lease, {"response": chunk, "sent_at": datetime.now(UTC).isoformat()}
        )
        if event is None:
            return False
        if job.span is not None:
            job.span.add_event("chunk", {"inferd.seq": event.seq})
        await self._publish(event)
        return True

    async def _heartbeat(self, job: _Job) -> None:
        while True:
            await asyncio.sleep(self.heartbeat_seconds)
            try:
                alive = await self.queue.heartbeat(job.lease, self.lease_seconds)
            except Exception as exc:  # keep trying until the lease runs out
                log.warning("heartbeat failed", request_id=job.lease.request_id, detail=repr(exc))
                continue
            if not alive:
                job.stop(_STOP_CANCELLED)
                return

    async def _settle(self, job: _Job, error: BaseException | None, seconds: float) -> None:
        lease, reason = job.lease, job.stop_reason
        event: Event | None = None
        outcome: str
        try:
            if reason == _STOP_SHUTDOWN:
                await self.queue.release(lease)
                outcome = "released"
            elif reason == _STOP_LOST:
                outcome = "lease lost"
            elif reason == _STOP_CANCELLED:
                event = await self.queue.finish_cancelled(lease)
                outcome = "cancelled" if event is not None else "lease lost"
            elif error is not None:
                retryable = not isinstance(error, InferdError) or error.retryable
                message = error.message if isinstance(error, InferdError) else repr(error)
                event = await self.queue.fail(lease, message[:2000], retryable=retryable)
                outcome = f"failed: {message[:200]}"
            else:
                result = self.executor.result(lease.model, job.chunks)
                event = await self.queue.complete(lease, result)
                outcome = "succeeded" if event is not None else "lease lost"
        except Exception as exc:
            log.error("could not record the outcome", request_id=lease.request_id, detail=repr(exc))
            return
        if event is not None:
            await self._publish(event)
            if self.on_terminal is not None and event.kind in (EventKind.DONE, EventKind.ERROR):
                try:
                    await self.on_terminal(lease, event, job.chunks)
                except Exception as exc:
                    log.error(
                        "settling usage failed", request_id=lease.request_id, detail=repr(exc)
                    )
        job.outcome = outcome
        if self.on_outcome is not None:
            self.on_outcome(lease.model, outcome.split(":", 1)[0], seconds)
        log.info(
            "job finished",
            request_id=lease.request_id,
            model=lease.model,
            attempt=lease.attempt,
            outcome=outcome,
            chunks=len(job.chunks),
            seconds=round(seconds, 3),
            worker=self.id,
        )

    async def _publish(self, event: Event) -> None:
        try:
            await self.bus.publish(event.request_id, event.seq)
        except Exception as exc:  # followers re-read the store; a lost wake-up only delays them
            log.warning("publish failed", request_id=event.request_id, detail=repr(exc))
