"""One model version: its runtime and batcher, and the load, check and warm-up it goes through.

The registry decides which versions serve and when; this module makes one of them ready.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from inferd.batching import Batcher
from inferd.concurrency import run_blocking
from inferd.logs import get_logger
from inferd.metrics import Deferred, Metrics, observe_many
from inferd.models.base import FloatArray, Model, WarmsUp
from inferd.models.repository import Fingerprint, ModelEntry
from inferd.models.runtimes import (
    create_model,
    default_concurrency,
    sample_batch,
    validate_output,
)
from inferd.models.spec import ModelSpec
from inferd.monitoring.reference import REFERENCE_FILE, LoadedReference, load_reference
from inferd.settings import Settings

if TYPE_CHECKING:  # inferd.generation imports the text runtime, whose package imports this
    from inferd.generation import GenerationScheduler

__all__ = ["LoadedModel", "ModelState", "prepare", "warm_up"]

log = get_logger("inferd.models")


class ModelState(enum.StrEnum):
    """Where a version is in its life: loading, serving, failed, draining, gone."""

    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"
    UNLOADED = "unloaded"


@dataclass(eq=False)
class LoadedModel:
    """One model version as served: the runtime, its batcher, its state."""

    entry: ModelEntry
    version: int
    model: Model
    batcher: Batcher[FloatArray, FloatArray] | None
    """None for text generation: those models serve long-running requests, and the
    OpenAI-compatible routes through :attr:`scheduler`."""
    state: ModelState = ModelState.LOADING
    error: str | None = None
    load_seconds: float | None = None
    loaded_at: float | None = None
    labels: list[str] | None = None
    classes: list[int | str] | None = None
    version_str: str = ""
    metrics_children: dict[str, Any] = field(default_factory=dict)
    fingerprint: Fingerprint = ()
    """The version folder as it was when loading began: unchanged means no reload needed."""
    reference: LoadedReference | None = None
    """The version's ``reference.json`` for drift detection, or why drift is off for it."""
    scheduler: GenerationScheduler | None = None
    """Continuous batching of a ``transformers`` text model (the OpenAI-compatible routes)."""

    name: str = field(init=False)
    """The model's name (its entry's, kept here: read on every request)."""
    spec: ModelSpec = field(init=False)
    """Its entry's spec (kept here: read several times on every request)."""

    n_features: int = field(init=False)
    """Numbers in one input row (its spec's, computed once)."""
    takes_images: bool = field(init=False)
    """Whether the model classifies images (its spec's, computed once)."""

    def __post_init__(self) -> None:
        spec = self.spec = self.entry.spec
        self.name = spec.name
        self.n_features = spec.n_features
        self.takes_images = spec.takes_images

    @property
    def ready(self) -> bool:
        return self.state is ModelState.READY

    def describe(self) -> dict[str, Any]:
        """Metadata for ``GET /v1/models/{name}``."""
        spec = self.spec
        return {
            "name": self.name,
            "version": self.version_str,
            "versions_available": [str(v) for v in self.entry.versions],
            "state": self.state.value,
            "ready": self.state is ModelState.READY,
            "runtime": spec.runtime,
            "task": spec.task,
            "description": spec.description,
            "load_seconds": self.load_seconds,
            "error": self.error,
            "device": self.device,
            **self._io(),
            "drift": self.reference.describe() if self.reference is not None else None,
        }

    @property
    def device(self) -> str | None:
        """Where the model runs (``cpu``, ``cuda``...), once loaded; scikit-learn is ``cpu``."""
        return self.model.capabilities.device

    def status(self, default: bool = False) -> dict[str, Any]:
        """One line of a model's version list: state, load time, error."""
        return {
            "version": self.version_str,
            "state": self.state.value,
            "ready": self.state is ModelState.READY,
            "default": default,
            "load_seconds": self.load_seconds,
            "loaded_at": self.loaded_at,
            "error": self.error,
        }

    def _io(self) -> dict[str, Any]:
        spec, batcher = self.spec, self.batcher
        if batcher is None and not spec.generates_text:  # a version that failed to load
            return {"inputs": self._inputs()}
        if batcher is None:
            io: dict[str, Any] = {
                "inputs": {"type": spec.input.type, "max_chars": spec.input.max_chars},
                "generation": spec.generation.model_dump() if spec.generation else None,
                "endpoint": "/v1/requests",
            }
            scheduler = self.scheduler
            if scheduler is not None:
                io["openai_endpoints"] = ["/openai/v1/completions", "/openai/v1/chat/completions"]
                io["continuous_batching"] = {
                    "max_sequences": scheduler.max_sequences,
                    "max_queue": scheduler.max_queue,
                    "active_sequences": scheduler.active,
                    "queue_depth": scheduler.depth,
                }
            return io
        return {
            "inputs": self._inputs(),
            "outputs": {"labels": self.labels, "classes": self.classes},
            "batching": {
                "max_batch_size": batcher.max_batch_size,
                "batch_window_ms": batcher.window * 1000.0,
                "max_queue_size": batcher.max_queue_size,
                "shed_at": batcher.shed_limit,
                "concurrency": batcher.concurrency,
            },
            "queue_depth": batcher.depth,
        }

    def _inputs(self) -> dict[str, Any]:
        spec = self.spec
        if spec.input.type == "image":
            image = spec.image
            return {
                "type": "image",
                "size": image.size,
                "channels": image.channels,
                "formats": list(image.formats),
                "max_bytes": image.max_bytes,
                "max_pixels": image.max_pixels,
                "endpoint": f"/v1/models/{spec.name}/classify",
            }
        return {"type": "tabular", "features": spec.input.features, "example": spec.input.example}


def prepare(
    entry: ModelEntry,
    version: int,
    settings: Settings,
    metrics: Metrics,
    fingerprint: Fingerprint = (),
    observe: Callable[[LoadedModel, Any, Any], None] | None = None,
) -> LoadedModel:
    """The runtime object and batcher of one version, not loaded yet. ``observe(loaded, rows,
    outputs)`` is called after each batch the model answered (drift monitoring)."""
    s, spec = settings, entry.spec
    b = spec.batching
    concurrency = b.concurrency or (
        s.batch_concurrency
        if "batch_concurrency" in s.model_fields_set
        else default_concurrency(spec) or s.batch_concurrency
    )
    model = create_model(spec, version, entry.artifact(version), concurrency=concurrency)
    vstr = str(version)
    m = metrics
    children: dict[str, Any] = {
        "latency": m.request_latency.labels(spec.name, vstr),
        "prediction": m.prediction_value.labels(spec.name, vstr),
        "timeouts": m.request_timeouts.labels(spec.name, vstr),
        "disconnects": m.client_disconnects.labels(spec.name, vstr),
    }
    # What the request path notes per request, applied when the deferred metrics fold.
    children["latency_noted"] = m.deferred.slot(children["latency"].observe)
    if spec.generates_text:
        children.update(
            prompt_tokens=m.prompt_tokens.labels(spec.name, vstr),
            generated_tokens=m.generated_tokens.labels(spec.name, vstr),
            first_token=m.time_to_first_token.labels(spec.name, vstr),
            token_gap=m.inter_token_latency.labels(spec.name, vstr),
            generations=lambda reason: m.generations.labels(spec.name, vstr, reason),
        )
    batch_size = m.batch_size.labels(spec.name, vstr)
    batch_latency = m.batch_latency.labels(spec.name, vstr)

    def on_batch(rows: int, seconds: float) -> None:
        batch_size.observe(rows)
        batch_latency.observe(seconds)

    size_of = m.deferred.slot(batch_size.observe)
    latency_of = m.deferred.slot(batch_latency.observe)

    def on_batch_noted(rows: int, seconds: float) -> None:  # the batcher's: on the loop
        size_of(rows)
        latency_of(seconds)

    def on_reject(reason: str) -> None:
        m.queue_rejections.labels(spec.name, vstr, reason).inc()

    batcher: Batcher[FloatArray, FloatArray] | None = None
    scheduler: GenerationScheduler | None = None
    if spec.generates_text and spec.runtime == "transformers":
        from inferd.generation import GenerationScheduler

        gen = spec.generation
        scheduler = GenerationScheduler(
            f"{spec.name!r} version {version}",
            max_sequences=gen.max_sequences or s.generation_max_sequences,
            max_queue=gen.max_queue or s.generation_max_queue,
            retry_after=s.retry_after_s,
            on_step=on_batch,  # sequences per forward pass, and its time
            on_reject=on_reject,
        )
    if not spec.generates_text:
        batcher = Batcher(
            model.predict,
            name=f"{spec.name}:{version}",
            max_batch_size=b.max_batch_size or s.max_batch_size,
            window=(b.batch_window_ms if b.batch_window_ms is not None else s.batch_window_ms)
            / 1000.0,
            max_queue_size=b.max_queue_size or s.max_queue_size,
            shed_threshold=s.shed_threshold,
            shed_wait=s.shed_wait,
            concurrency=concurrency,
            retry_after=s.retry_after_s,
            on_batch=on_batch_noted,
            on_reject=on_reject,
            inline_max=s.inline_max_us / 1e6,
            fair=s.fair_sharing,
        )
    loaded = LoadedModel(
        entry=entry,
        version=version,
        model=model,
        batcher=batcher,
        version_str=vstr,
        metrics_children=children,
        fingerprint=fingerprint,
        scheduler=scheduler,
    )
    if batcher is not None:
        batcher.on_output = _output_hook(loaded, observe, m.deferred)
    return loaded


def _output_hook(
    loaded: LoadedModel,
    observe: Callable[[LoadedModel, Any, Any], None] | None,
    deferred: Deferred,
) -> Callable[[Any, Any], None]:
    """What runs on each answered batch: ``prediction_value_distribution`` (one vectorized
    pass per batch, not per request, its observations applied with the other deferred ones)
    and the drift monitor's ``observe``, if any."""
    child = loaded.metrics_children["prediction"]

    def record_all(values: list[float]) -> None:
        observe_many(child, values)

    note = deferred.slot(record_all)

    def on_output(data: Any, output: Any) -> None:
        note(prediction_scores(output))
        if observe is not None:
            observe(loaded, data, output)

    return on_output


def prediction_scores(output: Any) -> list[float]:
    """What ``prediction_value_distribution`` observes per row: the top class probability of
    a classifier's probabilities, the value of a regressor."""
    array = np.asarray(output)
    if array.ndim == 2 and array.shape[1] > 1:
        array = array.max(axis=1)
    scores: list[float] = array.reshape(-1).tolist()
    return scores


async def warm_up(loaded: LoadedModel) -> None:
    """Load the artifact, check a sample batch and warm up every batcher thread; raises
    (ModelLoadError or what the runtime raised) when the version cannot serve."""
    batcher = loaded.batcher
    if batcher is None:
        await run_blocking(_load_streaming, loaded)
        if loaded.scheduler is not None:
            await _start_scheduler(loaded, loaded.scheduler)
    else:
        await run_blocking(_load_and_check, loaded)
        await batcher.on_each_worker(lambda: _warm_up(loaded))


def _load_and_check(loaded: LoadedModel) -> None:
    """Blocking: read the artifact and check a sample batch. Runs in a thread."""
    model, spec = loaded.model, loaded.spec
    model.load()
    loaded.classes = model.classes()
    loaded.labels = spec.output.labels
    if loaded.labels is None and loaded.classes is not None:
        loaded.labels = [str(c) for c in loaded.classes]
    batch = sample_batch(loaded.spec, _rows(loaded))
    validate_output(loaded.spec, loaded.version, loaded.classes, batch, model.predict(batch))
    loaded.reference = _reference(loaded)


def _reference(loaded: LoadedModel) -> LoadedReference:
    """Blocking: the version's reference.json; a malformed one turns drift off, loudly."""
    folder = loaded.entry.folder / str(loaded.version)
    found = load_reference(folder / REFERENCE_FILE, loaded.spec, loaded.labels)
    if not found.enabled and found.path.is_file():
        log.warning(
            "drift detection is off for this version",
            model=loaded.name,
            version=loaded.version,
            detail=found.detail,
        )
    return found


def _load_streaming(loaded: LoadedModel) -> None:
    """Blocking: load a text model and run one short generation through it."""
    model = loaded.model
    model.load()
    if model.capabilities.warms_up:
        cast(WarmsUp, model).warm_up()


async def _start_scheduler(loaded: LoadedModel, scheduler: GenerationScheduler) -> None:
    """Start the version's scheduler and run one short generation through its thread (the
    first forward pass in a new thread pays for per-thread set-up)."""
    from inferd.generation import GenerationRequest
    from inferd.generation.engine import TorchEngine

    model: Any = loaded.model
    scheduler.start(await run_blocking(TorchEngine, model))
    limit = loaded.spec.generation.max_new_tokens_limit
    settings = model.request_settings("Hello", {"max_new_tokens": min(2, limit), "seed": 0})
    ids = model.prompt_ids(settings.prompt)
    await scheduler.generate(GenerationRequest(ids, settings, model.budget(ids, settings)))


def _warm_up(loaded: LoadedModel) -> None:
    """Blocking: one full batch through the model, in the thread that will serve it."""
    loaded.model.predict(sample_batch(loaded.spec, _rows(loaded)))


def _rows(loaded: LoadedModel) -> int:
    return loaded.batcher.max_batch_size if loaded.batcher is not None else 1
