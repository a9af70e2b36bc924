"""Shadow traffic: a candidate version gets copies of answered requests, compared, never sent.

With ``[shadow]`` in a model's ``model.toml`` (:class:`~inferd.models.spec.ShadowSpec`), the
data plane hands :meth:`Shadow.mirror` each request it has answered, with the rows it decoded
and the output it is about to send. A share of them is queued on the candidate version's
batcher in the background: the caller's answer never waits for it and never fails because of
it. The copy is dropped, and counted ``dropped``, when ``max_pending`` copies are in flight or
either version has a full batch waiting in its queue (or half its shedding mark, if less):
under load the shadow goes first, long
before a request that is answered (those are shed at the queue's shedding mark).

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

from inferd.errors import InferdError
from inferd.logs import get_logger
from inferd.metrics import Metrics
from inferd.models.registry import LoadedModel, ModelRegistry
from inferd.models.spec import ShadowSpec

__all__ = ["Shadow", "compare"]

log = get_logger("inferd.shadow")


class Shadow:
    """Copies answered requests to candidate versions (see the module's docstring)."""

    def __init__(
        self,
        registry: ModelRegistry,
        metrics: Metrics | None = None,
        draw: Callable[[], float] = random.random,
    ) -> None:
        self.registry = registry
        self.metrics = metrics
        self._draw = draw
        self._pending: set[asyncio.Task[None]] = set()
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
        ):
            self._count(name, label, "dropped")
            return
        task = asyncio.get_running_loop().create_task(
            self._copy(candidate, spec, payload, rows, output)
        )
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _copy(
        self, candidate: LoadedModel, spec: ShadowSpec, payload: Any, rows: int, answer: Any
    ) -> None:
        name, label = candidate.name, str(spec.version)
        batcher = candidate.batcher
        assert batcher is not None
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        try:
            output = (await batcher.submit(payload, rows, loop.time() + spec.timeout_ms / 1000))[0]
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the candidate's failure is a figure, not an error here
            self._count(name, label, "error")
            log.debug("shadow copy failed", model=name, version=label, detail=repr(exc))
            return
        seconds = time.perf_counter() - started
        agree, difference = compare(candidate.spec.task, spec.tolerance, answer, output)
        self._count(name, label, "agree" if agree else "disagree")
        if self.metrics is not None:
            self.metrics.shadow_latency.labels(name, label).observe(seconds)
            if difference is not None:
                self.metrics.shadow_difference.labels(name, label).observe(difference)

    async def drain(self) -> None:
        """Wait for the copies in flight (tests, shutdown)."""
        while self._pending:
            await asyncio.gather(*list(self._pending), return_exceptions=True)


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
