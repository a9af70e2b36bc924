"""The data plane: the one procedure every synchronous prediction goes through.

``POST /predict``, ``/v1/models/{name}[/versions/{v}]/predict``, the Open Inference Protocol,
image classification and the tabular long-running requests all call :meth:`DataPlane.infer`
(text generation, :meth:`DataPlane.generate`)
with an :class:`Inbound`: the protocol's part of the request (which models it serves, how its
body is read and decoded, how the answer is encoded). Everything else is done here, once:

1. look the model version up (404, 503 while loading) and let the route refuse it (a text
   model on a tabular route...);
2. admission: the request's tenant (its key) and priority (:mod:`inferd.tenancy.priority`);
   shed with 503 before the body is read, when the model's queue is past the priority's mark
   or the key holds more than its share of it;
3. read and decode the body; the deadline counts from the request's arrival;
4. reserve the caller's tokens for the rows (429 when the daily budget is spent);
5. a version swapped out while the body was read (or decoded, or charged) sends the request to
   the version that serves now, decoded and validated against that one;
6. run it at once when it is alone and its model idle and known to be quick (no queue, no
   hop to a thread), else queue it on the version's batcher, dropped unrun if the caller goes
   away (under uvicorn the batcher asks the connection; elsewhere a task waits for the
   disconnect when the request will wait); 504 at the deadline;
7. refund the reservation of a request that was not served, record the served ones;
8. the per-version latency and the access-log fields (model, version, queue depth, batch size,
   queue time); with tracing on, the times the request's spans are made from (admitted,
   answered) and its batch's span (:mod:`inferd.tracing`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Generic, Protocol, TypeVar

from inferd.errors import DeadlineExceeded
from inferd.generation import GenerationRequest, Step
from inferd.models.registry import LoadedModel, ModelRegistry, ModelState
from inferd.serving.cache import MemoryResults, ResultCache
from inferd.serving.context import ClientGone, RequestContext
from inferd.serving.generate import generate
from inferd.serving.shadow import Shadow
from inferd.serving.traffic import Traffic
from inferd.tenancy.enforce import Enforcer
from inferd.tenancy.priority import placement

__all__ = ["DataPlane", "Decoded", "Inbound"]

_READY = ModelState.READY

M = TypeVar("M")
R = TypeVar("R")
R_co = TypeVar("R_co", covariant=True)


@dataclass(slots=True)
class Decoded(Generic[M]):
    """A request body decoded for one model version."""

    payload: Any
    """What the batcher concatenates with other requests' payloads along the first axis."""
    rows: int
    """Rows in ``payload``: its share of a batch and the tokens it costs."""
    meta: M
    """Whatever the route needs again to encode the answer (request form, outputs asked)."""
    timeout: float | None = None
    """A shorter deadline asked for inside the body (seconds), if any."""


class Inbound(Protocol[R_co]):
    """One prediction request as its protocol carried it (see the module's docstring)."""

    @property
    def ctx(self) -> RequestContext:
        """The request's context: access-log fields, caller's key, arrival time."""

    @property
    def model(self) -> str | None:
        """The model asked for; None for the server's default model."""

    @property
    def version(self) -> int | None:
        """The version asked for; None for the model's default version."""

    @property
    def timeout(self) -> float:
        """Seconds the request may take from its arrival: the route's limit, or less if the
        client asked (``X-Request-Timeout-Ms``, a gRPC deadline)."""

    def accept(self, loaded: LoadedModel) -> None:
        """Raise the route's 4xx if it cannot serve ``loaded`` (say where to go instead)."""

    async def read(self, loaded: LoadedModel) -> None:
        """Read the request body (its limits may depend on the model)."""

    async def decode(
        self, loaded: LoadedModel, deadline: float, previous: Decoded[Any] | None
    ) -> Decoded[Any]:
        """The body decoded and validated for ``loaded``. Called again with ``previous`` when
        the version was swapped while the body was read (a route may reuse what still holds).
        ``deadline`` is on the loop's clock."""

    def disconnect_probe(self) -> Callable[[], bool] | None:
        """A cheap ``() -> bool`` that says the caller has gone, or None if there is none."""

    def watch(self, future: asyncio.Future[Any]) -> asyncio.Task[None] | None:
        """Without a probe: a task that cancels ``future`` when the caller goes (or None)."""

    def encode(self, loaded: LoadedModel, decoded: Decoded[Any], output: Any) -> R_co:
        """The answer to send for the model's ``output`` rows."""


class DataPlane:
    """Runs :class:`Inbound` requests on the registry's models (see the module's docstring)."""

    def __init__(
        self,
        registry: ModelRegistry,
        enforcer: Enforcer | None = None,
        cache: ResultCache | None = None,
    ) -> None:
        self.registry = registry
        self.enforcer = enforcer
        self.cache = cache or ResultCache(MemoryResults(registry.metrics), registry.metrics)
        """Answers of models with a ``[cache]`` table (:mod:`inferd.serving.cache`)."""
        self.traffic = Traffic(registry, registry.metrics)
        """Splits between versions and their rollback (:mod:`inferd.serving.traffic`)."""
        self.shadow = Shadow(registry, registry.metrics)
        """Copies of answered requests to candidate versions (:mod:`inferd.serving.shadow`)."""
        self.in_flight = 0
        """Requests being served (:meth:`infer`) now, of every transport: one alone may run
        at once on an idle model; with others about, batching them costs less."""

    def lookup(self, inbound: Inbound[Any]) -> LoadedModel:
        """The ready version ``inbound`` asks for, once the route accepts it."""
        name = inbound.model
        if name is None:
            loaded = self.registry.get_default()
        else:
            loaded = self.registry.get(name, inbound.version)
        inbound.accept(loaded)
        return loaded

    def infer(self, inbound: Inbound[R]) -> Coroutine[Any, Any, R]:
        """Serve one prediction (await it); raises :class:`~inferd.errors.InferdError` (a 4xx
        or 5xx to answer) or :class:`ClientGone` (nobody to answer).

        Not a coroutine of its own: it picks the version that serves (a split may choose it)
        and hands over the coroutine that serves the request on it, one layer less on every
        request's way to the batcher and back."""
        name = inbound.model  # (lookup(), inlined: this is every request's path)
        if name is None:
            loaded = self.registry.get_default()
        else:
            loaded = self.registry.get(name, inbound.version)
        if inbound.version is None and (
            loaded.entry.spec.split is not None or self.traffic.overrides
        ):  # a split between versions picks the one that serves (serving/traffic.py)
            return self._split(loaded, inbound)
        return self._infer(loaded, inbound)

    def _split(self, loaded: LoadedModel, inbound: Inbound[R]) -> Coroutine[Any, Any, R]:
        """:meth:`infer` through the split of ``loaded``'s model (a method of its own: the
        closure would cost :meth:`infer` two cells per request, split or not)."""
        return self.traffic.serve(loaded, inbound.ctx, lambda chosen: self._infer(chosen, inbound))

    async def _infer(self, loaded: LoadedModel, inbound: Inbound[R]) -> R:
        """:meth:`infer` once the version is known."""
        self.in_flight += 1  # every transport's: a lone request may run at once (see _run)
        try:
            ctx = inbound.ctx
            inbound.accept(loaded)
            ctx.model, ctx.version = loaded.name, loaded.version_str
            batcher = loaded.batcher
            assert batcher is not None, "the route accepted a model without a batcher"
            # Its lane in the queue: the key's share, the priority it may have.
            ctx.tenant, ctx.priority = placement(ctx.key, ctx.headers)
            batcher.check_admission(ctx.tenant, ctx.priority)  # shed before reading the body
            if ctx.trace is not None:
                ctx.trace.admitted = time.perf_counter()

            await inbound.read(loaded)
            # Swapped for a new version while the body was read? The old one drains and takes
            # nothing more: decode for (and send to) what serves now.
            if loaded.state is not _READY:
                loaded = self._current(loaded, inbound)
            deadline = ctx.started_loop + inbound.timeout
            decoded = await inbound.decode(loaded, deadline, None)
            if decoded.timeout is not None:
                deadline = min(deadline, ctx.started_loop + decoded.timeout)

            enforcer, key, quota = self.enforcer, ctx.key, None
            if key is not None and enforcer is not None:
                quota = ctx.quota = (
                    enforcer.charge_now(key, decoded.rows, ctx.rate)
                    if enforcer.immediate
                    else await enforcer.charge(key, decoded.rows, ctx.rate)
                )
            try:
                if loaded.state is not _READY:  # swapped while it was decoded or charged
                    loaded = self._current(loaded, inbound)
                    decoded = await inbound.decode(loaded, deadline, decoded)
                if loaded.entry.spec.cache is None:
                    output = await self._run(loaded, decoded, deadline, inbound, ctx)
                else:  # [cache]: a hit skips the batcher (serving/cache.py)
                    output = await self._cached(loaded, decoded, deadline, inbound, ctx)
            except BaseException:
                if quota is not None and enforcer is not None:
                    # Not served, not charged (shielded: a cancelled caller still gives it back).
                    await asyncio.shield(enforcer.refund(key, quota))
                raise
            if quota is not None and enforcer is not None:
                enforcer.record(key, loaded.name, quota.day, decoded.rows)
            if loaded.entry.spec.shadow is not None:  # a copy to the candidate (serving/shadow.py)
                self.shadow.mirror(loaded, decoded.payload, decoded.rows, output)

            # prediction_value_distribution is observed per batch, by the batcher's output hook.
            loaded.metrics_children["latency_noted"](time.perf_counter() - ctx.started)
            return inbound.encode(loaded, decoded, output)
        finally:
            self.in_flight -= 1

    def generate(
        self,
        ctx: RequestContext,
        loaded: LoadedModel,
        request: GenerationRequest,
        gone: Callable[[], bool] | None = None,
    ) -> AsyncGenerator[Step, None]:
        """The steps of one generation on a text model's scheduler, with the same budget and
        context as :meth:`infer` (see :func:`inferd.serving.generate.generate`)."""
        return generate(ctx, loaded, request, self.enforcer, gone)

    def _current(self, loaded: LoadedModel, inbound: Inbound[Any]) -> LoadedModel:
        """The version that serves the request now, ``loaded`` having been swapped out."""
        current = self.registry.refresh(loaded, inbound.version)
        if current is not loaded:
            inbound.accept(current)
            inbound.ctx.version = current.version_str
        return current

    async def _cached(
        self,
        loaded: LoadedModel,
        decoded: Decoded[Any],
        deadline: float,
        inbound: Inbound[Any],
        ctx: RequestContext,
    ) -> Any:
        """:meth:`_run` through the result cache."""
        output, hit = await self.cache.infer(
            loaded, decoded.payload, lambda: self._run(loaded, decoded, deadline, inbound, ctx)
        )
        if hit:
            ctx.detail = "cache hit"
        return output

    async def _run(
        self,
        loaded: LoadedModel,
        decoded: Decoded[Any],
        deadline: float,
        inbound: Inbound[Any],
        ctx: RequestContext,
    ) -> Any:
        """Queue the payload and wait for its batch; the batcher fails it at the deadline."""
        batcher = loaded.batcher
        assert batcher is not None
        ctx.queue_depth = batcher.depth
        gone = inbound.disconnect_probe()
        watch = None
        ctx.submitted = time.perf_counter()
        if self.in_flight <= 1 and batcher.inline:
            # Alone? Requests read in the same turn of the loop have not all reached this
            # point yet: give them one turn to say so (or to queue and share a batch).
            await asyncio.sleep(0)
            if self.in_flight <= 1:  # alone: run it here if the model is idle and quick
                started = time.perf_counter()
                done = batcher.run_now(decoded.payload, decoded.rows, deadline, gone)
                if done is not None:  # no queue: its queue time is nil
                    ctx.batch_size, ctx.dequeued = done[1], started
                    if ctx.trace is not None:
                        ctx.trace.answered = time.perf_counter()
                    return done[0]
        # No probe, and it will wait for a batch: worth a task that notices a disconnect.
        waits = gone is None and (batcher.depth >= batcher.max_batch_size or batcher.running)
        future = batcher.submit(
            decoded.payload, decoded.rows, deadline, gone, ctx.trace, ctx.tenant, ctx.priority
        )
        if waits:
            watch = inbound.watch(future)
        try:
            output, batch_rows, ctx.dequeued, batch_span = await future
        except DeadlineExceeded:
            loaded.metrics_children["timeouts"].inc()
            ctx.detail = "deadline exceeded"
            raise
        except asyncio.CancelledError:
            task = asyncio.current_task()
            if future.cancelled() and task is not None and not task.cancelling():
                # The item was dropped because the caller left, not this task cancelled.
                loaded.metrics_children["disconnects"].inc()
                raise ClientGone from None
            raise
        finally:
            if watch is not None:
                watch.cancel()
            if not future.done():
                future.cancel()
        ctx.batch_size = batch_rows
        if ctx.trace is not None:
            ctx.trace.answered, ctx.trace.batch = time.perf_counter(), batch_span
        return output
