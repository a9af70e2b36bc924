"""How a long-running request runs on a model: validation up front, then its chunks.

Streaming models (text generation, user code with ``stream``) yield many chunks, computed in a
worker's thread (:meth:`ModelExecutor.chunks`). Any other model answers with one chunk, and
runs like a synchronous prediction: through the data plane and the version's batcher
(:meth:`ModelExecutor.predict`), so a job shares batches with the synchronous traffic, counts
against the batcher's bound, and never runs on a version that is being unloaded.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any, cast

from inferd import tracing
from inferd.codec import parse_predict_doc, render_rows
from inferd.errors import InferdError, ModelNotFound, ValidationFailed
from inferd.models.base import RequestValidator, StreamingModel
from inferd.models.registry import LoadedModel, ModelRegistry, ModelState
from inferd.models.spec import JobsSpec
from inferd.serving import DataPlane, Decoded, RequestContext

__all__ = ["ModelExecutor"]


class ModelExecutor:
    """Validates and runs requests against the models of a registry."""

    def __init__(
        self,
        registry: ModelRegistry,
        max_instances: int = 1024,
        timeout: float = 30.0,
        plane: DataPlane | None = None,
    ) -> None:
        self.registry = registry
        self.plane = plane if plane is not None else DataPlane(registry)
        self.max_instances = max_instances
        self.timeout = timeout
        """How long a non-streaming job waits for its batch (seconds)."""
        self._gates: dict[str, threading.BoundedSemaphore] = {}
        self._gates_lock = threading.Lock()

    def _gate(self, loaded: LoadedModel) -> threading.BoundedSemaphore:
        """How many requests one streaming model runs at once (``batching.concurrency``,
        default 1): a generation uses every core torch is given, so two at once only take
        turns and both finish later."""
        with self._gates_lock:
            gate = self._gates.get(loaded.name)
            if gate is None:
                gate = threading.BoundedSemaphore(loaded.spec.batching.concurrency or 1)
                self._gates[loaded.name] = gate
            return gate

    def _loaded(self, name: str) -> LoadedModel:
        loaded = self.registry.find(name)
        if loaded is None:
            served = ", ".join(self.registry.expected) or "none"
            raise ModelNotFound(f"model {name!r} is not served here (served models: {served})")
        return loaded

    def version_of(self, name: str) -> str | None:
        """The version of ``name`` that serves requests now."""
        loaded = self.registry.find(name)
        return loaded.version_str if loaded is not None else None

    def jobs_options(self, name: str) -> JobsSpec:
        """The ``[jobs]`` table of ``name``'s model.toml (queue bound, TTL, deduplication)."""
        return self._loaded(name).spec.jobs

    def streams(self, name: str) -> bool:
        """Whether ``name`` answers in chunks (its usage is the chunks it produced)."""
        loaded = self.registry.find(name)
        return loaded is not None and _streams(loaded)

    def tokens(self, name: str, input: Any, parameters: dict[str, Any]) -> int:
        """What a request costs against a daily budget: rows for tabular models, the most new
        tokens a text model may generate, one for other streaming models."""
        loaded = self._loaded(name)
        spec = loaded.spec
        if spec.generates_text:
            asked = parameters.get("max_new_tokens")
            default = spec.generation.max_new_tokens if spec.generation is not None else 1
            return int(asked) if isinstance(asked, int) else default
        if _streams(loaded):
            return 1
        return int(self._rows(loaded, input, parameters).shape[0])

    def validates_on_loop(self, name: str) -> bool:
        """Whether :meth:`validate` is cheap enough for the event loop: parsing a tabular
        request's rows is (the synchronous routes parse them there too); a model's own check
        (a text model tokenizes its prompt) is not."""
        loaded = self.registry.find(name)
        return loaded is None or not loaded.model.capabilities.validates_requests

    def validate(self, name: str, input: Any, parameters: dict[str, Any]) -> None:
        """Raise a 4xx error now rather than fail the request later (404, 422)."""
        loaded = self._loaded(name)
        if loaded.state is ModelState.FAILED:
            raise ModelNotFound(f"model {name!r} failed to load: {loaded.error}")
        model = loaded.model
        if model.capabilities.validates_requests:
            cast(RequestValidator, model).validate_request(input, parameters)
            return
        if _streams(loaded):
            return  # user code with a stream() validates its own input when it runs
        self._rows(loaded, input, parameters)

    def _rows(self, loaded: LoadedModel, input: Any, parameters: dict[str, Any]) -> Any:
        if parameters:
            raise ValidationFailed(
                f"model {loaded.name!r} takes no parameters; got {', '.join(sorted(parameters))}"
            )
        if not isinstance(input, dict):
            raise ValidationFailed(
                f"input for model {loaded.name!r} must be an object like "
                '{"features": [...]} or {"instances": [[...], ...]}'
            )
        spec = loaded.spec
        return parse_predict_doc(
            input, spec.n_features, spec.input.features, self.max_instances, allow_batch=True
        ).rows

    async def predict(
        self,
        request_id: str,
        name: str,
        input: Any,
        parameters: dict[str, Any],
        should_stop: Callable[[], bool],
    ) -> Any:
        """The one chunk of a non-streaming model's request, computed in the version's batcher
        (a job whose ``should_stop`` turns true while it waits is dropped unrun)."""
        loop = asyncio.get_running_loop()
        ctx = RequestContext(request_id, time.perf_counter(), loop.time())
        inbound = _JobInbound(self, ctx, name, input, parameters, should_stop)
        if tracing.tracer is None:
            return await self.plane.infer(inbound)
        # Traced: the data plane's phases under a "predict" span, child of the job's run.
        ctx.trace = tracing.RequestTrace.internal("predict", ctx.started, {})
        try:
            return await self.plane.infer(inbound)
        except InferdError as exc:
            ctx.detail, ctx.status = exc.message, exc.status_code
            raise
        finally:
            ctx.end_trace()

    def chunks(
        self,
        name: str,
        input: Any,
        parameters: dict[str, Any],
        should_stop: Callable[[], bool],
    ) -> Iterator[Any]:
        """The chunks of a streaming model's request (blocking, in a worker's thread). The last
        one is not special: see :meth:`result`."""
        loaded = self._loaded(name)
        if not _streams(loaded):
            raise ValidationFailed(f"model {name!r} does not stream; run it with predict()")
        gate = self._gate(loaded)
        while not gate.acquire(timeout=0.2):
            if should_stop():
                return
        try:
            yield from cast(StreamingModel, loaded.model).stream(input, parameters, should_stop)
        finally:
            gate.release()

    def result(self, name: str, chunks: list[Any]) -> Any:
        """The final result of a request from all its chunks."""
        loaded = self._loaded(name)
        if _streams(loaded):
            if all(isinstance(chunk, str) for chunk in chunks):
                return {"text": "".join(chunks), "model": name, "model_version": loaded.version_str}
            return {"chunks": chunks, "model": name, "model_version": loaded.version_str}
        return chunks[-1] if chunks else None


class _JobInbound:
    """A non-streaming job's input, as the data plane sees it."""

    def __init__(
        self,
        executor: ModelExecutor,
        ctx: RequestContext,
        name: str,
        input: Any,
        parameters: dict[str, Any],
        should_stop: Callable[[], bool],
    ) -> None:
        self.executor = executor
        self.ctx = ctx
        self.model: str | None = name
        self.version: int | None = None
        self.timeout = executor.timeout
        self.input = input
        self.parameters = parameters
        self.should_stop = should_stop

    def accept(self, loaded: LoadedModel) -> None:
        if _streams(loaded) or loaded.batcher is None:
            raise ValidationFailed(f"model {loaded.name!r} streams; it runs chunk by chunk")
        if loaded.spec.takes_images:
            raise ValidationFailed(
                f"model {loaded.name!r} takes images; POST them to "
                f"/v1/models/{loaded.name}/classify"
            )

    async def read(self, loaded: LoadedModel) -> None:
        return None  # the input came with the job

    async def decode(
        self, loaded: LoadedModel, deadline: float, previous: Decoded[Any] | None
    ) -> Decoded[None]:
        rows = self.executor._rows(loaded, self.input, self.parameters)
        return Decoded(rows, int(rows.shape[0]), None)

    def disconnect_probe(self) -> Callable[[], bool] | None:
        return self.should_stop

    def watch(self, future: asyncio.Future[Any]) -> asyncio.Task[None] | None:
        return None

    def encode(self, loaded: LoadedModel, decoded: Decoded[None], output: Any) -> Any:
        return {
            "model": loaded.name,
            "model_version": loaded.version_str,
            "predictions": render_rows(output, loaded.spec.task, loaded.classes, loaded.labels),
        }


def _streams(loaded: LoadedModel) -> bool:
    return loaded.model.capabilities.streams
