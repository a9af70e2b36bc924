"""The micro-batcher: a bounded queue in front of one model version.

Policy, for each model version:

* A request joins a bounded queue; past the shedding mark (80 % by default) it is refused at once
  with :class:`~inferd.errors.Overloaded`, so overload shows up as cheap 503s instead of
  timeouts. A request has a priority (:mod:`inferd.batching.fair`): high ones are refused only
  when the queue is full, low ones already at half the mark; a tenant (an API key) holding
  its share of the mark or more, in a queue past half of it, is refused before the others,
  and a tenant under its share may still use the head-room above the mark.
  It is refused too when the oldest request in the queue has waited there more than
  ``shed_wait`` (a fraction; 0: never) of its time to deadline: the queue then holds more than
  the model serves in time, whatever its length (a queue of 500 is fine for a model that serves
  50,000 rows a second and hopeless for one that serves 50).
* When the model has a free slot and nothing is running, whatever is queued (up to
  ``max_batch_size`` rows) goes to the model at once: a lone request never waits out the window.
  Batches are filled by priority, then by deficit round robin over the tenants waiting, so that
  one key sending ten times its share does not push the others' requests back.
* While a batch runs, arrivals pile up and form the next batch. With ``concurrency`` > 1, a
  partial batch waits up to ``window`` for companions before it takes another slot.
* Items whose deadline passed or whose caller went away (future done) are dropped before they
  reach the model. A batch that raises fails each of its callers with
  :class:`~inferd.errors.ModelError`; the batcher keeps running.
* Model work runs in the batcher's own threads, except when the model's calls are known to be
  short (their moving average at most ``inline_max`` seconds, measured first in the threads):
  the hop to a thread and back then costs more than the call, and batches run on the event
  loop. A request that finds such a model idle (nothing queued, nothing running) runs at once,
  without even queueing (:meth:`Batcher.run_now`).
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import numpy as np

from inferd import tracing
from inferd.batching.fair import NORMAL, PRIORITIES, FairQueue
from inferd.errors import DeadlineExceeded, InferdError, ModelError, Overloaded

__all__ = ["Batcher", "BatcherStats"]

log = logging.getLogger("inferd.batching")

_TIMER_GRANULARITY = 0.001  # seconds; the deadline timer fires at most this often
_INLINE_EVIDENCE = 8  # calls timed in a thread before the batches may move to the loop

In = TypeVar("In")
Out = TypeVar("Out")


@dataclass(slots=True)
class _Item(Generic[In]):
    payload: In
    rows: int
    future: asyncio.Future[Any]
    deadline: float
    enqueued: float
    gone: Callable[[], bool] | None
    trace: Any = None  # the request's RequestTrace while tracing is on


@dataclass(slots=True)
class BatcherStats:
    """Counters a test or the console can read without scraping metrics."""

    batches: int = 0
    rows: int = 0
    dropped_expired: int = 0
    dropped_cancelled: int = 0
    failed_batches: int = 0
    inline_batches: int = 0
    """Batches (and lone requests) run on the event loop instead of a thread."""
    last_batch_size: int = 0


def _stack(payloads: Sequence[Any]) -> Any:
    return payloads[0] if len(payloads) == 1 else np.concatenate(payloads)


def _split(output: Any, counts: Sequence[int]) -> list[Any]:
    if len(counts) == 1:
        return [output]
    parts, start = [], 0
    for n in counts:
        parts.append(output[start : start + n])
        start += n
    return parts


class Batcher(Generic[In, Out]):
    """Collects requests for one model version into batches and runs them in threads."""

    def __init__(
        self,
        fn: Callable[[Any], Any],
        *,
        name: str,
        max_batch_size: int = 32,
        window: float = 0.005,
        max_queue_size: int = 2000,
        shed_threshold: float = 0.8,
        shed_wait: float = 0.0,
        concurrency: int = 1,
        collate: Callable[[Sequence[In]], Any] = _stack,
        split: Callable[[Any, Sequence[int]], list[Out]] = _split,
        retry_after: float = 1.0,
        on_batch: Callable[[int, float], None] | None = None,
        on_reject: Callable[[str], None] | None = None,
        on_drop: Callable[[str], None] | None = None,
        on_output: Callable[[Any, Any], None] | None = None,
        inline_max: float = 0.0,
        fair: bool = True,
    ) -> None:
        if max_batch_size < 1 or max_queue_size < 1 or concurrency < 1:
            raise ValueError("max_batch_size, max_queue_size and concurrency must be >= 1")
        self.name = name
        self.max_batch_size = max_batch_size
        self.window = window
        self.max_queue_size = max_queue_size
        self.shed_limit = max(1, min(max_queue_size, int(max_queue_size * shed_threshold)))
        self.limits = (max_queue_size, self.shed_limit, max(1, self.shed_limit // 2))
        """Queue depth at which a request of each priority is refused: high ones only when
        the queue is full, normal ones past the shedding mark, low ones at half of it."""
        self.fair = fair
        """Whether tenants share the queue fairly (else one lane per priority)."""
        self._fair_mark = max(1, self.shed_limit // 2)
        self.concurrency = concurrency
        self.shed_wait = shed_wait
        self.retry_after = retry_after
        self.stats = BatcherStats()
        self._fn = fn
        self._collate = collate
        self._split = split
        self._on_batch = on_batch
        self._on_reject = on_reject
        self._on_drop = on_drop
        self.on_output = on_output
        """Called on the loop with each batch's collated payload and the model's output, once
        its callers have their results (drift monitoring); what it raises is logged."""
        self._queue: FairQueue[_Item[In]] = FairQueue(max(1, max_batch_size // 4))
        self._running = 0
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._executor = ThreadPoolExecutor(
            max_workers=concurrency, thread_name_prefix=f"inferd-{name}"
        )
        self._inflight: set[asyncio.Task[None]] = set()
        self._deadlines: list[tuple[float, int, asyncio.Future[Any]]] = []
        self._sequence = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = math.inf
        self._loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.inline_max = inline_max
        """Calls known to take at most this long (seconds) run on the loop (0: never)."""
        self.inline = False
        """Whether batches run on the loop now (see :meth:`_note_call`)."""
        self._thread_calls: deque[float] = deque(maxlen=_INLINE_EVIDENCE)
        self._loop_seconds = 0.0

    # ------------------------------------------------------------------ lifecycle
    @property
    def depth(self) -> int:
        """Requests waiting in the queue (not yet handed to the model)."""
        return self._queue.depth

    @property
    def running(self) -> int:
        """Batches being computed right now."""
        return self._running

    def start(self) -> None:
        """Start the collector task on the running loop."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.get_running_loop().create_task(
            self._collect(), name=f"batcher:{self.name}"
        )
        self._task.add_done_callback(self._collector_died)

    async def on_each_worker(self, fn: Callable[[], Any]) -> None:
        """Run ``fn`` once in every worker thread (warm-up: thread-local buffers of numerical
        libraries are allocated on a thread's first call, which must not be a request's)."""
        barrier = threading.Barrier(self.concurrency, timeout=60)

        def call() -> Any:
            barrier.wait()
            return fn()

        loop = asyncio.get_running_loop()
        await asyncio.gather(
            *(loop.run_in_executor(self._executor, call) for _ in range(self.concurrency))
        )

    async def stop(self, grace: float = 5.0) -> None:
        """Stop taking requests, let queued and running work finish within ``grace``, then
        fail whatever is left with a retryable 503."""
        self._closing = True
        self._wake.set()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._drained()), grace)
            except TimeoutError:
                log.warning("batcher %s did not drain in %.1fs; cancelling", self.name, grace)
            self._task.cancel()
            for task in self._inflight:  # a model call cannot be interrupted; its callers can
                task.cancel()
            await asyncio.gather(self._task, *self._inflight, return_exceptions=True)
        for item in self._queue.drain():
            _fail(item.future, Overloaded(f"model {self.name} is shutting down; retry"))
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._executor.shutdown(wait=False, cancel_futures=True)

    async def _drained(self) -> None:
        while self._queue or self._running:
            self._idle.clear()
            await self._idle.wait()

    def _collector_died(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            log.critical("batcher %s collector died: %r", self.name, exc, exc_info=exc)

    # ------------------------------------------------------------------ admission
    def check_admission(self, tenant: str = "", priority: int = NORMAL) -> None:
        """Raise :class:`Overloaded` if a request of ``tenant`` at ``priority`` would be shed:
        the queue past its priority's mark, ``tenant`` holding more than its share of a queue
        past half its mark, or the oldest request waiting past ``shed_wait`` of its time (see
        the module's docstring). Costs a few comparisons, and a look at the head of each
        tenant's queue when ``shed_wait`` is on and something is queued."""
        queue = self._queue
        depth = queue.depth
        self._admit(tenant, priority, depth)
        if depth and self.shed_wait:
            head = queue.oldest()
            assert head is not None
            waited = self._loop.time() - head.enqueued
            if waited > (head.deadline - head.enqueued) * self.shed_wait:
                self._reject(depth, waited)

    def _admit(self, tenant: str, priority: int, depth: int) -> None:
        """Refuse a request of ``tenant`` at ``priority`` when the queue is past its priority's
        mark (a normal-priority request of a key under its share may still use the head-room
        above the mark, so that a key that filled the queue alone does not shut the others
        out), or when ``tenant`` holds more than its share of a queue past half its mark."""
        if self._closing:
            self._reject(depth, priority=priority)
        if depth >= self.limits[priority]:
            if not (
                priority == NORMAL
                and self.fair
                and depth < self.max_queue_size
                and self._within_share(tenant)
            ):
                self._reject(depth, priority=priority)
        elif depth >= self._fair_mark and self.fair:
            self._check_share(tenant, depth)

    def _within_share(self, tenant: str) -> bool:
        queue = self._queue
        held = queue.held(tenant)
        tenants = queue.tenants + (held == 0)  # it would join those with requests waiting
        return held * tenants < self.shed_limit

    def _check_share(self, tenant: str, depth: int) -> None:
        """Refuse ``tenant`` when it holds its share of the shedding mark or more."""
        queue = self._queue
        held = queue.held(tenant)
        if queue.tenants + (held == 0) > 1 and not self._within_share(tenant):
            if self._on_reject is not None:
                self._on_reject("fair_share")
            raise Overloaded(
                f"model {self.name} is overloaded and this caller holds {held} of its "
                f"{depth} queued requests, more than its share; retry later",
                retry_after=self.retry_after,
            )

    def _reject(self, depth: int, waited: float | None = None, priority: int = NORMAL) -> None:
        if self._closing:
            raise Overloaded(
                f"model {self.name} is shutting down; retry on another replica",
                retry_after=self.retry_after,
            )
        if waited is not None:
            if self._on_reject is not None:
                self._on_reject("wait")
            raise Overloaded(
                f"model {self.name} is overloaded: the oldest of its {depth} queued requests "
                f"has waited {waited * 1000:.0f} ms; retry later",
                retry_after=self.retry_after,
            )
        reason = "full" if depth >= self.max_queue_size else "shed"
        if self._on_reject is not None:
            self._on_reject(reason)
        level = "" if priority == NORMAL else f"{PRIORITIES[priority]}-priority "
        raise Overloaded(
            f"model {self.name} is overloaded: {depth} requests queued "
            f"(shedding {level}requests at {self.limits[priority]} of "
            f"{self.max_queue_size}); retry later",
            retry_after=self.retry_after,
        )

    def submit(
        self,
        payload: In,
        rows: int,
        deadline: float,
        gone: Callable[[], bool] | None = None,
        trace: Any = None,
        tenant: str = "",
        priority: int = NORMAL,
    ) -> asyncio.Future[tuple[Out, int, float, Any]]:
        """Queue ``payload`` (``rows`` rows); the future gives its output, the row count of
        the batch it ran in, when that batch started (``time.perf_counter()``) and the batch's
        span context (None unless traced), or fails with :class:`DeadlineExceeded` at
        ``deadline`` (on the loop's clock), whether the item is still queued or already in the
        model. ``gone``, if given, says whether the caller has left; such items are dropped
        unrun. ``trace``: the request's :class:`~inferd.tracing.RequestTrace`, linked from the
        batch's span. ``tenant`` (who pays for it: an API key's id) and ``priority`` (an index
        of :data:`~inferd.batching.fair.PRIORITIES`) place it in the queue (see
        :mod:`inferd.batching.fair`) and decide when it is shed.
        """
        self._admit(tenant, priority, self._queue.depth)
        if self._task is None:
            raise RuntimeError(f"batcher {self.name} is not started")
        loop = self._loop
        future: asyncio.Future[tuple[Out, int, float, Any]] = loop.create_future()
        self._queue.push(
            _Item(payload, rows, future, deadline, loop.time(), gone, trace),
            tenant if self.fair else "",
            priority,
        )
        heapq.heappush(self._deadlines, (deadline, next(self._sequence), future))
        if deadline < self._timer_at:
            self._arm(deadline)
        if not self._wake.is_set():
            self._wake.set()
        return future

    def run_now(
        self,
        payload: In,
        rows: int,
        deadline: float,
        gone: Callable[[], bool] | None = None,
    ) -> tuple[Out, int] | None:
        """Run ``payload`` at once on the calling (event loop) thread and return what
        :meth:`submit`'s future would give, when the model is idle and its calls are known to
        be short (see the module's docstring); None when the request must be queued instead
        (also when its deadline has passed or its caller has gone: the queue answers those).
        Raises what a batch would fail its callers with."""
        if (
            not self.inline
            or self._queue
            or self._running
            or self._closing
            or self._task is None
            or rows > self.max_batch_size
            or deadline <= self._loop.time()
            or (gone is not None and gone())
        ):
            return None
        started, cpu = time.perf_counter(), time.thread_time()
        try:
            data = self._collate([payload])
            output = self._fn(data)
            part = self._split(output, [rows])[0]
        except Exception as exc:
            self.stats.failed_batches += 1
            log.error("batch of %d rows failed in model %s: %r", rows, self.name, exc)
            error = _model_error(exc, self.name, rows)
            if error is exc:
                raise
            raise error from exc
        finally:
            elapsed = time.perf_counter() - started
            self._note_call(time.thread_time() - cpu, True)
            self.stats.batches += 1
            self.stats.inline_batches += 1
            self.stats.rows += rows
            self.stats.last_batch_size = rows
            if self._on_batch is not None:
                self._on_batch(rows, elapsed)
        if self.on_output is not None:
            try:
                self.on_output(data, output)
            except Exception as exc:
                log.error("batch hook of model %s failed: %r", self.name, exc)
        return part, rows

    # ------------------------------------------------------------------ deadlines
    # One timer per batcher instead of one per request: deadlines sit in a heap, the timer is
    # armed for the earliest that may still matter, and entries whose request has finished are
    # discarded when they reach the top. With a common timeout the heap stays in arrival order,
    # so the timer fires about once per timeout period while traffic flows.

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = self._loop.call_at(when, self._expire_due)

    def _expire_due(self) -> None:
        self._timer, self._timer_at = None, math.inf
        heap = self._deadlines
        now = self._loop.time()
        while heap and (heap[0][0] <= now or heap[0][2].done()):
            _, _, future = heapq.heappop(heap)
            if not future.done():
                future.set_exception(
                    DeadlineExceeded("the model did not answer before the deadline")
                )
        if heap:
            self._arm(max(heap[0][0], now + _TIMER_GRANULARITY))

    # ------------------------------------------------------------------ collector
    async def _collect(self) -> None:
        loop = asyncio.get_running_loop()
        queue = self._queue
        while True:
            if not queue or self._running >= self.concurrency:
                if self._closing and not queue and not self._running:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._running and self.window > 0 and queue.rows < self.max_batch_size:
                # Another batch is running and this one is partial: give it the window.
                oldest = queue.oldest()
                assert oldest is not None
                remaining = oldest.enqueued + self.window - loop.time()
                if remaining > 0:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), remaining)
                    except TimeoutError:
                        pass
                    else:
                        continue
            if queue.rows < self.max_batch_size:
                # Let the requests that arrived in this loop tick join before dispatching.
                await asyncio.sleep(0)
            batch = self._take(loop.time())
            if not batch:
                continue
            self._running += 1
            task = loop.create_task(self._execute(batch), name=f"batch:{self.name}")
            self._inflight.add(task)
            task.add_done_callback(self._inflight.discard)

    def _take(self, now: float) -> list[_Item[In]]:
        return self._queue.take(self.max_batch_size, lambda item: self._keep(item, now))

    def _keep(self, item: _Item[In], now: float) -> bool:
        """Whether a queued item still goes to the model (else it is dropped, and counted)."""
        if item.gone is not None and item.gone():
            item.future.cancel()
        if item.future.done():
            self.stats.dropped_cancelled += 1
            if self._on_drop is not None:
                self._on_drop("cancelled")
            return False
        if item.deadline <= now:
            self.stats.dropped_expired += 1
            _expire(item.future, self.name)
            return False
        return True

    def _timed(self, data: Any) -> tuple[Any, float]:
        started = time.perf_counter()
        output = self._fn(data)
        return output, time.perf_counter() - started

    def _note_call(self, seconds: float, on_loop: bool) -> None:
        """Move batches to the loop when the quickest of the last few calls timed in a thread
        took at most ``inline_max`` (wall time, which also counts the time the thread waited for
        the core or the GIL: the quickest is the call's own time, and a model that waits, for a
        device or a sleep, is never quick); back to the threads when the moving average of the
        CPU time of the calls on the loop exceeds it (CPU time: the wall time of a call on a
        busy machine counts whatever else ran on the core meanwhile)."""
        if on_loop:
            average = self._loop_seconds = self._loop_seconds + 0.1 * (seconds - self._loop_seconds)
            if average > self.inline_max:
                self.inline = False
                self._thread_calls.clear()
            return
        if self.inline_max <= 0:
            return
        calls = self._thread_calls
        calls.append(seconds)
        if len(calls) == _INLINE_EVIDENCE and min(calls) <= self.inline_max:
            self.inline = True
            self._loop_seconds = min(calls)

    async def _execute(self, batch: list[_Item[In]]) -> None:
        loop = asyncio.get_running_loop()
        rows = sum([item.rows for item in batch])
        started = time.perf_counter()
        traced = None  # the batch's span, when a request in it is traced
        if tracing.tracer is not None:
            traces = [item.trace for item in batch]
            traced = tracing.BatchTrace.start(traces, self.name, rows, len(batch), started)
        link = traced.context if traced is not None else None
        try:
            data = self._collate([item.payload for item in batch])
            if traced is not None:
                traced.model_started = time.perf_counter()
            if self.inline:  # the call is quicker than the hop to a thread and back
                self.stats.inline_batches += 1
                cpu = time.thread_time()
                output = self._fn(data)
                self._note_call(time.thread_time() - cpu, True)
            else:
                output, seconds = await loop.run_in_executor(self._executor, self._timed, data)
                self._note_call(seconds, False)
            if traced is not None:
                traced.model_call(time.perf_counter())
            parts = self._split(output, [item.rows for item in batch])
        except asyncio.CancelledError:
            for item in batch:
                _fail(item.future, Overloaded(f"model {self.name} is shutting down; retry"))
            raise
        except Exception as exc:  # the model's failure is each caller's failure
            if traced is not None:
                traced.fail(repr(exc)[:200])
            self.stats.failed_batches += 1
            log.error("batch of %d rows failed in model %s: %r", rows, self.name, exc)
            error = _model_error(exc, self.name, rows)
            for item in batch:
                _fail(item.future, error)
        else:
            for item, part in zip(batch, parts, strict=True):
                if not item.future.done():
                    item.future.set_result((part, rows, started, link))
            if self.on_output is not None:
                try:
                    self.on_output(data, output)
                except Exception as exc:
                    log.error("batch hook of model %s failed: %r", self.name, exc)
        finally:
            if traced is not None:
                traced.end()
            elapsed = time.perf_counter() - started
            self._running -= 1
            self.stats.batches += 1
            self.stats.rows += rows
            self.stats.last_batch_size = rows
            if self._on_batch is not None:
                self._on_batch(rows, elapsed)
            self._wake.set()
            if not self._queue and not self._running:
                self._idle.set()


def _model_error(exc: Exception, name: str, rows: int) -> InferdError:
    if isinstance(exc, InferdError):
        return exc
    return ModelError(
        f"model {name} failed on a batch of {rows} rows: {type(exc).__name__}: {str(exc)[:200]}"
    )


def _expire(future: asyncio.Future[Any], name: str) -> None:
    if not future.done():
        future.set_exception(DeadlineExceeded("the model did not answer before the deadline"))


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
