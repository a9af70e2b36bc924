"""How a long-running request runs on a model: validation up front, then a stream of chunks.

Models with a ``stream`` method (text generation, user code) yield many chunks; any other model
is run once through ``predict`` and gives one chunk. All of it is blocking and runs in a
worker's thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

from inferd.codec import parse_predict_doc, render_rows
from inferd.errors import ModelNotFound, ValidationFailed
from inferd.models.registry import LoadedModel, ModelRegistry, ModelState

__all__ = ["ModelExecutor"]


class ModelExecutor:
    """Validates and runs requests against the models of a registry."""

    def __init__(self, registry: ModelRegistry, max_instances: int = 1024) -> None:
        self.registry = registry
        self.max_instances = max_instances
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

    def validate(self, name: str, input: Any, parameters: dict[str, Any]) -> None:
        """Raise a 4xx error now rather than fail the request later (404, 422)."""
        loaded = self._loaded(name)
        if loaded.state is ModelState.FAILED:
            raise ModelNotFound(f"model {name!r} failed to load: {loaded.error}")
        model = loaded.model
        validate = getattr(model, "request_validator", None) or getattr(
            model, "validate_request", None
        )
        if callable(validate):
            validate(input, parameters)
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

    def chunks(
        self,
        name: str,
        input: Any,
        parameters: dict[str, Any],
        should_stop: Callable[[], bool],
    ) -> Iterator[Any]:
        """The chunks of one request (blocking). The last one is not special: see
        :meth:`result`."""
        loaded = self._loaded(name)
        if _streams(loaded):
            gate = self._gate(loaded)
            while not gate.acquire(timeout=0.2):
                if should_stop():
                    return
            try:
                yield from loaded.model.stream(input, parameters, should_stop)  # type: ignore[attr-defined]
            finally:
                gate.release()
            return
        rows = self._rows(loaded, input, parameters)
        output = loaded.model.predict(rows)
        yield {
            "model": loaded.name,
            "model_version": loaded.version_str,
            "predictions": render_rows(output, loaded.spec.task, loaded.classes, loaded.labels),
        }

    def result(self, name: str, chunks: list[Any]) -> Any:
        """The final result of a request from all its chunks."""
        loaded = self._loaded(name)
        if _streams(loaded):
            if all(isinstance(chunk, str) for chunk in chunks):
                return {"text": "".join(chunks), "model": name, "model_version": loaded.version_str}
            return {"chunks": chunks, "model": name, "model_version": loaded.version_str}
        return chunks[-1] if chunks else None


def _streams(loaded: LoadedModel) -> bool:
    stream = getattr(loaded.model, "stream", None)
    can = getattr(loaded.model, "can_stream", True)
    return callable(stream) and bool(can)
