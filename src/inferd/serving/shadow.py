"""Shadow traffic: a candidate version gets copies of answered requests, compared, never sent.

With ``[shadow]`` in a model's ``model.toml`` (:class:`~inferd.models.spec.ShadowSpec`), the
data plane hands :meth:`Shadow.mirror` each request it has answered, with the rows it decoded
and the output it is about to send. A share of them is queued on the candidate version's
batcher in the background: the caller's answer never waits for it and never fails because of
it. The copy is dropped, and counted ``dropped``, when ``max_pending`` copies are in flight,
when either version has a full batch waiting in its queue (or half its shedding mark, if
less), or when the event loop's thread was busy more than ``max_busy`` (75 %) of the last
100 ms: under
load the shadow goes first, long before a request that is answered (those are shed at the
queue's shedding mark). A copy is a low-priority request of the candidate's queue, and costs
no task: the comparison runs in the callback of its batch's answer.

For each copy the candidate answered: ``agree`` when every row has the same label
(classification) or differs by at most ``tolerance`` (regression), else ``disagree``; the
largest absolute difference of scores, and the candidate's own latency. A failure or a
timeout of the candidate is ``error``. Metrics: ``inference_shadow_requests_total{model,
version, result}``, ``inference_shadow_score_difference`` and
``inference_shadow_latency_seconds`` (``version`` is the candidate's).
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from inferd.batching import LOW
from inferd.errors import InferdError
from inferd.logs import get_logger
from inferd.metrics import Metrics
from inferd.models.registry import LoadedModel, ModelRegistry
from inferd.models.spec import ShadowSpec

__all__ = ["Shadow", "compare"]

log = get_logger("inferd.shadow")


_WINDOW = 0.1  # seconds over which the loop's busy share is measured


class LoopLoad:
    """How busy the event loop's thread has been: its CPU time over the wall time of the last
    completed window of :data:`_WINDOW` seconds, read lazily (a clock read per call)."""

    __slots__ = ("_cpu", "_wall", "busy")

    def __init__(self) -> None:
        self._wall = time.monotonic()
        self._cpu = time.thread_time()
        self.busy = 0.0

    def current(self) -> float:
        """The busy share (0..1) of the last window; call it on the loop's thread."""
        now = time.monotonic()
        elapsed = now - self._wall
        if elapsed >= _WINDOW:
            cpu = time.thread_time()
            self.busy = min(1.0, (cpu - self._cpu) / elapsed)
            self._wall, self._cpu = now, cpu
        return self.busy


class Shadow:
    """Copies answered requests to candidate versions (see the module's docstring)."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics | None = None,
        draw: Callable[[], float] = random.random,
        load: LoopLoad | None = None,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self._draw = draw
        self.load = load or LoopLoad()
        self._pending: set[asyncio.Future[Any]] = set()
        self._counters: dict[tuple[str, str, str], Any] = {}

    @property
    def pending(self) -> int:
        return len(self._pending)

    def _count(self, name: str, version: str, result: str) -> None:
        if self.metrics is None:
            return
        counter = self._counters.get((name, version, result))
        if counter is None:
            counter = self.metrics.shadow_requests.labels(name, version, result)
            self._counters[(name, version, result)] = counter
        counter.inc()

    def mirror(self, loaded: LoadedModel, payload: Any, rows: int, output: Any) -> None:
        """Maybe send a copy of a request ``loaded`` answered with ``output`` to the shadow."""
        spec = loaded.entry.spec.shadow
        if spec is None or spec.version == loaded.version:
            return
        if spec.share < 1.0 and self._draw() >= spec.share:
            return
        name, label = loaded.name, str(spec.version)
        try:
            candidate = self.registry.get(name, spec.version)
        except InferdError:
            self._count(name, label, "dropped")  # not served (yet)
            return
        mine, theirs = loaded.batcher, candidate.batcher
        if (
            theirs is None
            or mine is None
            or len(self._pending) >= spec.max_pending
            or mine.depth >= min(mine.max_batch_size, max(1, mine.shed_limit // 2))
            or theirs.depth >= min(theirs.max_batch_size, max(1, theirs.shed_limit // 2))
            or self.load.current() > spec.max_busy
        ):
            self._count(name, label, "dropped")
            return
        loop = asyncio.get_running_loop()
        try:  # low priority: refused long before an answered request would be
            future = theirs.submit(
                payload, rows, loop.time() + spec.timeout_ms / 1000, priority=LOW
            )
        except InferdError:
            self._count(name, label, "dropped")
            return
        self._pending.add(future)
        started = time.perf_counter()
        future.add_done_callback(lambda done: self._compare(done, candidate, spec, output, started))

    def _compare(
        self,
        done: asyncio.Future[Any],
        candidate: LoadedModel,
        spec: ShadowSpec,
        answer: Any,
        started: float,
    ) -> None:
        """The candidate's answer to a copy, against the one sent."""
        self._pending.discard(done)
        name, label = candidate.name, str(spec.version)
        if done.cancelled():  # the server is stopping
            return
        exc = done.exception()
        if exc is not None:  # the candidate's failure is a figure, not an error here
            self._count(name, label, "error")
            log.debug("shadow copy failed", model=name, version=label, detail=repr(exc))
            return
        seconds = time.perf_counter() - started
        agree, difference = compare(candidate.spec.task, spec.tolerance, answer, done.result()[0])
        self._count(name, label, "agree" if agree else "disagree")
        if self.metrics is not None:
            self.metrics.shadow_latency.labels(name, label).observe(seconds)
            if difference is not None:
                self.metrics.shadow_difference.labels(name, label).observe(difference)

    async def drain(self) -> None:
        """Wait for the copies in flight (tests, shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)
            await asyncio.sleep(0)  # their callbacks


def compare(task: str, tolerance: float, answer: Any, output: Any) -> tuple[bool, float | None]:
    """(agree, largest absolute difference of scores) of two outputs of the same rows."""
    try:
        mine = np.asarray(answer, dtype=np.float64)
        theirs = np.asarray(output, dtype=np.float64)
    except (TypeError, ValueError):
        return bool(np.array_equal(answer, output)), None
    if mine.shape != theirs.shape:
        return False, None
    difference = float(np.max(np.abs(mine - theirs))) if mine.size else 0.0
    if task == "classification" and mine.ndim == 2:
        agree = bool(np.array_equal(mine.argmax(axis=1), theirs.argmax(axis=1)))
    else:
        agree = difference <= tolerance
    return agree, difference
