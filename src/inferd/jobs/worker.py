"""Workers: lease jobs, run them on the model in a thread, store every chunk, finish fenced.

A worker holds up to ``concurrency`` leases, taken several per claim (one transaction for
all the slots that are free). For each one it runs the model's chunks in a thread; every
chunk is stored (fenced by the lease token) before followers are woken, and one task for all
of the worker's jobs extends the lease of each that runs longer than ``heartbeat_seconds``
(a task per job, started and cancelled around every run, cost more than most jobs' model
call: ~30 µs here). Writes go through a group commit: the chunks and completions that the
jobs ask for while one transaction runs are stored together in the next one, each still
fenced on its own lease, and followers are woken for all of them in one publish. An idle
worker waits for the API's announcement of new requests on the bus, which wakes one idle
worker, not all of them (:meth:`~inferd.jobs.types.EventBus.announce`); a worker that
claimed as many jobs as it asked for announces again, so that another one joins in. It
polls the queue every ``poll_seconds`` as well in case an announcement is lost. After a
claim that found fewer jobs than asked for, a worker claims again no sooner than
``claim_interval`` seconds later, so that the jobs queued meanwhile come in one claim (one
transaction) rather than one each.

When a heartbeat is refused (the request was cancelled, or the lease was lost to another
worker) the model is asked to stop between chunks, and whatever the worker writes afterwards
is fenced: a worker that lost its lease changes nothing.

Shutdown is staged: stop claiming, let running jobs finish within the grace period, then stop
them and hand their jobs back to the queue without burning an attempt.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
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
from inferd.jobs.types import Event, EventBus, EventKind, JobQueue, JobWrite, Lease
from inferd.logs import AccessLog, get_logger

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
    unsaved: list[dict[str, Any]] = field(default_factory=list)  # stored with the completion
    beat_at: float = 0.0  # the loop's time of this job's next heartbeat
    beating: asyncio.Task[None] | None = None  # the heartbeat in flight
    ending: bool = False  # the run is over: a heartbeat's answer no longer stops it

    def stop(self, reason: str) -> None:
        if self.stop_reason is None:
            self.stop_reason = reason
        self.stopped.set()


_Result = asyncio.Future[list[Event] | None]


class _Writer:
    """Group commit: writes asked for while a batch is being stored go in the next one. Up to
    ``lanes`` batches are stored at once (each its own transaction). A streamed chunk (a
    write that does not finish its job: a follower waits for it) goes in a batch of such
    writes only, which never waits for batches of completions: with two lanes or more, those
    hold all but one at most, so that a chunk waits for no batch to be stored, and a lane
    that frees takes the chunks first; a chunk that finds a lane free and nothing pending is
    stored at once by its job's own task. A lease has at most one write pending (its job
    awaits each), so batches never share one."""

    def __init__(self, queue: JobQueue, bus: EventBus, max_batch: int, lanes: int = 1) -> None:
        self.queue, self.bus, self.max_batch = queue, bus, max_batch
        self._pending: list[tuple[JobWrite, _Result]] = []
        self._kick = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._lanes = lanes
        self._busy = 0  # batches being stored
        self._finishing = 0  # of which batches of completions
        self._flushing: set[asyncio.Task[None]] = set()
        self.batches = 0  # transactions run
        self.writes = 0  # writes stored in them

    async def write(self, write: JobWrite) -> list[Event] | None:
        """Store ``write`` with whatever else is pending; its events, or None if the lease
        was lost. Followers have been woken when this returns."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Event] | None] = loop.create_future()
        if not write.done and self._busy < self._lanes and not self._pending:
            # A chunk that finds a lane free and nothing waiting: stored by its own task,
            # without the hand-off to the writer's task and then to a batch's task (two
            # turns of a busy event loop, 1-1.5 ms at p99 at 1,000 jobs/s).
            self._busy += 1
            try:
                await self._flush([(write, future)])
            finally:
                self._busy -= 1
                if self._pending:
                    self._kick.set()
            return future.result()
        self._pending.append((write, future))
        self._kick.set()
        if self._task is None or self._task.done():
            self._task = loop.create_task(self._run(), name="job-writer")
        return await future

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self._kick.wait()
            self._kick.clear()
            while self._pending and self._busy < self._lanes:
                batch, finishing = self._take()
                if not batch:
                    break
                self._busy += 1
                self._finishing += finishing
                task = loop.create_task(self._flush(batch), name="job-write")
                self._flushing.add(task)
                task.add_done_callback(functools.partial(self._flushed, finishing=finishing))

    def _take(self) -> tuple[list[tuple[JobWrite, _Result]], bool]:
        """The next batch to store, and whether it is one of completions: the chunks
        pending if any, else the writes pending if a lane may take completions."""
        pending = self._pending
        chunks = [item for item in pending if not item[0].done]
        if chunks:
            rest = [item for item in pending if item[0].done]
            self._pending = rest + chunks[self.max_batch :]
            return chunks[: self.max_batch], False
        if self._finishing >= max(1, self._lanes - 1):
            return [], True
        batch = pending[: self.max_batch]
        del pending[: self.max_batch]
        return batch, True

    def _flushed(self, task: asyncio.Task[None], *, finishing: bool) -> None:
        self._flushing.discard(task)
        self._busy -= 1
        self._finishing -= finishing
        self._kick.set()

    async def _flush(self, batch: list[tuple[JobWrite, _Result]]) -> None:
        self.batches += 1
        self.writes += len(batch)
        try:
            results = await self.queue.write([write for write, _ in batch])
        except Exception as exc:  # every job of the batch sees the failure, as it would alone
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise
        stored = [event for events in results if events for event in events]
        if stored:
            try:  # the events themselves: followers need not read them back from the store
                await self.bus.publish_events(stored)
            except Exception as exc:  # followers re-read the store; a lost wake-up only delays
                log.warning("publish failed", detail=repr(exc))
        for (_, future), events in zip(batch, results, strict=True):
            if not future.done():
                future.set_result(events)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        for task in list(self._flushing):
            task.cancel()
        if self._flushing:
            await asyncio.wait(list(self._flushing))
        for _, future in self._pending:
            future.cancel()
        self._pending.clear()


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
        max_batch: int = 256,
        claim_interval: float = 0.01,
        lines: AccessLog | None = None,
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
        self.claim_interval = claim_interval
        self.lines = lines
        """Where the ``job finished`` lines are noted and written in batches (one a job: at a
        thousand jobs a second, structlog's chain for each cost ~8 % of the worker's CPU);
        None: through structlog."""
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()  # set while the claim loop waits for news
        self._closing = False
        self._jobs: dict[asyncio.Task[None], _Job] = {}
        self._beater: asyncio.Task[None] | None = None  # heartbeats while jobs run
        # Transactions of writes in flight at once: on PostgreSQL, a chunk need not wait for
        # the batch of completions being stored (the store says; SQLite has one writer).
        self._writer = _Writer(queue, bus, max_batch, getattr(queue, "write_lanes", 1))

    # ------------------------------------------------------------------ running
    def wake(self) -> None:
        """A job was just queued by this process: look now instead of at the next poll."""
        self._wake.set()

    async def run(self) -> None:
        """Claim and run jobs until :meth:`stop`."""
        log.info("worker started", worker=self.id, concurrency=self.concurrency)
        await self._warm()
        loop = asyncio.get_running_loop()
        listener = loop.create_task(self._listen(), name="worker-listen")
        flusher = loop.create_task(self._flush_lines(), name="worker-log") if self.lines else None
        partial_at: float | None = None  # when the last claim that found too few began
        try:
            while not self._closing:
                free = self.concurrency - len(self._jobs)
                if free <= 0:
                    await asyncio.wait(set(self._jobs), return_when=asyncio.FIRST_COMPLETED)
                    continue
                if partial_at is not None:
                    # Not again at once: the jobs queued meanwhile come in one claim.
                    delay, partial_at = partial_at + self.claim_interval - loop.time(), None
                    if delay > 0:
                        await asyncio.sleep(delay)
                        continue  # stopped meanwhile?
                self._wake.clear()  # before the claim: an announcement during it is kept
                # At most half the slots per claim: two groups of jobs, one claimed while
                # the other one's writes are stored.
                wanted = min(free, max(1, self.concurrency // 2))
                claimed_at = loop.time()
                leases = await self._claim(wanted)
                for lease in leases:
                    self._start(lease)
                if len(leases) >= wanted:  # there may be more: another idle worker helps
                    partial_at = None
                    await self._announce()
                    continue
                partial_at = claimed_at
                # The queue is empty for now: wait for an announcement (or the poll).
                self._idle.set()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), self.poll_seconds)
                self._idle.clear()
        finally:
            self._idle.clear()
            for task in (listener, flusher):
                if task is not None:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if self.lines is not None:
                self.lines.flush()

    async def _flush_lines(self) -> None:
        """Every 0.1 s: write the noted ``job finished`` lines."""
        assert self.lines is not None
        while True:
            await asyncio.sleep(0.1)
            self.lines.flush()

    async def _warm(self) -> None:
        """Open the connections and prepare the statements of a job's first seconds before
        any job runs: done on the first job instead, on a busy machine, that can take longer
        than a short lease, which the job then loses. The writes use a lease of no request,
        so they change nothing."""
        nobody = Lease(
            request_id="", token="", attempt=0, expires_at=datetime.now(UTC), model="",
            input=None, parameters={},
        )  # fmt: skip
        try:
            warm = getattr(self.queue, "warm", None)
            if warm is not None:
                await warm(3)  # the claim, the writer and a heartbeat at once
            await self.queue.heartbeat(nobody, self.lease_seconds)
            await self.queue.write([JobWrite(nobody, ({"response": None},), done=True)])
        except Exception as exc:  # the claim loop reports a database that does not answer
            log.warning("could not warm up", worker=self.id, detail=repr(exc))

    async def _listen(self) -> None:
        """While the claim loop waits for news, take announcements of queued requests for
        it: each one wakes a single idle worker of all processes (see
        :mod:`inferd.jobs.events`)."""
        while not self._closing:
            await self._idle.wait()
            try:
                taken = await self.bus.wait_announced(self.poll_seconds)
            except Exception as exc:  # the poll still finds the jobs
                log.warning("queue announcements lost", worker=self.id, detail=repr(exc))
                await asyncio.sleep(self.poll_seconds)
                continue
            if not taken:
                continue
            if self._idle.is_set():
                self._wake.set()
            else:  # busy since: an idle worker (if any) takes it instead
                await self._announce()

    async def _announce(self) -> None:
        try:
            await self.bus.announce()
        except Exception as exc:  # the other workers' poll still finds the jobs
            log.warning("announcement failed", worker=self.id, detail=repr(exc))

    async def run_burst(self) -> int:
        """Run jobs until none is claimable and none is running; return how many ran."""
        before = self.processed
        await self._warm()
        try:
            while True:
                free = self.concurrency - len(self._jobs)
                if free > 0 and not self._closing:
                    for lease in await self._claim(free):
                        self._start(lease)
                if not self._jobs:
                    return self.processed - before
                await asyncio.wait(set(self._jobs), return_when=asyncio.FIRST_COMPLETED)
        finally:
            await self._stop_beating()
            await self._writer.close()
            if self.lines is not None:
                self.lines.flush()

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
        await self._stop_beating()
        await self._writer.close()
        if self.lines is not None:
            self.lines.flush()  # the jobs finished since the run loop ended
        log.info("worker stopped", worker=self.id, processed=self.processed)

    async def _claim(self, limit: int) -> list[Lease]:
        try:
            return await self.queue.claim_many(self.id, self.lease_seconds, limit, self.models)
        except Exception as exc:  # a database hiccup must not kill the worker
            log.warning("claim failed", worker=self.id, detail=repr(exc))
            await asyncio.sleep(self.poll_seconds)
            return []

    def _start(self, lease: Lease) -> None:
        loop = asyncio.get_running_loop()
        job = _Job(lease, beat_at=loop.time() + self.heartbeat_seconds)
        task = loop.create_task(self._process(job), name=f"job:{lease.request_id}")
        self._jobs[task] = job
        task.add_done_callback(self._finished)
        if self._beater is None or self._beater.done():
            self._beater = loop.create_task(self._beat_jobs(), name="worker-heartbeats")

    async def _beat_jobs(self) -> None:
        """While jobs run: every quarter of ``heartbeat_seconds``, start the heartbeat of each
        job whose turn has come (``heartbeat_seconds`` after it started, or after its last
        heartbeat ended). A job shorter than that sends none."""
        loop = asyncio.get_running_loop()
        while self._jobs:
            await asyncio.sleep(self.heartbeat_seconds / 4)
            now = loop.time()
            for job in list(self._jobs.values()):
                if job.beat_at <= now and job.beating is None and not job.ending:
                    job.beating = loop.create_task(
                        self._beat(job), name=f"heartbeat:{job.lease.request_id}"
                    )

    async def _beat(self, job: _Job) -> None:
        """One heartbeat: a refusal (cancelled, or the lease is lost) stops the job between
        chunks; a failure is logged and tried again at the job's next turn."""
        alive = True
        try:
            alive = await self.queue.heartbeat(job.lease, self.lease_seconds)
        except Exception as exc:  # keep trying until the lease runs out
            log.warning("heartbeat failed", request_id=job.lease.request_id, detail=repr(exc))
        finally:
            job.beating = None
            job.beat_at = asyncio.get_running_loop().time() + self.heartbeat_seconds
        if not alive and not job.ending:
            job.stop(_STOP_CANCELLED)

    async def _stop_beating(self) -> None:
        beater, self._beater = self._beater, None
        beating = [job.beating for job in self._jobs.values() if job.beating is not None]
        for task in [beater, *beating]:
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    def _finished(self, task: asyncio.Task[None]) -> None:
        self._jobs.pop(task, None)
        self.processed += 1
        if not task.cancelled() and task.exception() is not None:
            log.error("job task crashed", detail=repr(task.exception()))

    # ------------------------------------------------------------------ one job
    async def _process(self, job: _Job) -> None:
        lease = job.lease
        log.debug(
            "job started",
            request_id=lease.request_id,
            model=lease.model,
            attempt=lease.attempt,
            worker=self.id,
        )
        loop = asyncio.get_running_loop()
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
            job.ending = True  # the outcome is decided: a heartbeat's answer changes nothing
            if job.beating is not None:
                job.beating.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await job.beating
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
        # Stored with the completion, in one transaction: the one chunk is the whole answer.
        job.unsaved.append({"response": chunk, "sent_at": datetime.now(UTC).isoformat()})
        job.chunks.append(chunk)

    async def _store(self, job: _Job, chunk: Any) -> bool:
        data = {"response": chunk, "sent_at": datetime.now(UTC).isoformat()}
        stored = await self._writer.write(JobWrite(job.lease, (data,)))  # publishes too
        if stored is None:
            return False
        if job.span is not None:
            for event in stored:
                job.span.add_event("chunk", {"inferd.seq": event.seq})
        return True

    async def _settle(self, job: _Job, error: BaseException | None, seconds: float) -> None:
        lease, reason = job.lease, job.stop_reason
        event: Event | None = None
        outcome: str
        published = False
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
                done = JobWrite(lease, tuple(job.unsaved), done=True, result=result)
                written = await self._writer.write(done)  # publishes too
                published = True
                event = written[-1] if written else None
                if job.span is not None and written:
                    for chunk_event in written[:-1]:  # a one-chunk answer stored with it
                        job.span.add_event("chunk", {"inferd.seq": chunk_event.seq})
                outcome = "succeeded" if event is not None else "lease lost"
        except Exception as exc:
            log.error("could not record the outcome", request_id=lease.request_id, detail=repr(exc))
            return
        if event is not None:
            if not published:
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
        fields = {
            "request_id": lease.request_id,
            "model": lease.model,
            "attempt": lease.attempt,
            "outcome": outcome,
            "chunks": len(job.chunks),
            "seconds": round(seconds, 3),
            "worker": self.id,
        }
        if self.lines is not None:
            if self.lines.enabled:  # (off below the info level)
                self.lines.request(**fields, event="job finished", logger="inferd.worker")
        else:
            log.info("job finished", **fields)

    async def _publish(self, event: Event) -> None:
        try:
            await self.bus.publish(event.request_id, event.seq)
        except Exception as exc:  # followers re-read the store; a lost wake-up only delays them
            log.warning("publish failed", request_id=event.request_id, detail=repr(exc))
