"""The live models: load, validate, warm up, serve through a batcher, drain and unload."""

from __future__ import annotations

import asyncio
import enum
import time
from dataclasses import dataclass, field
from typing import Any

from inferd.batching import Batcher
from inferd.concurrency import run_blocking
from inferd.errors import InferdError, ModelLoadError, ModelNotFound, ModelNotReady
from inferd.logs import get_logger
from inferd.metrics import Metrics
from inferd.models.base import FloatArray, Model
from inferd.models.repository import ModelEntry, ModelRepository
from inferd.models.runtimes import create_model, sample_batch, validate_output
from inferd.models.spec import ModelSpec
from inferd.settings import Settings

__all__ = ["LoadedModel", "ModelRegistry", "ModelState", "create_model"]

log = get_logger("inferd.models")


class ModelState(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    FAILED = "failed"
    UNLOADING = "unloading"


@dataclass(eq=False)
class LoadedModel:
    """One model version as served: the runtime, its batcher, its state."""

    entry: ModelEntry
    version: int
    model: Model
    batcher: Batcher[FloatArray, FloatArray] | None
    """None for text generation: those models serve long-running requests only."""
    state: ModelState = ModelState.LOADING
    error: str | None = None
    load_seconds: float | None = None
    loaded_at: float | None = None
    labels: list[str] | None = None
    classes: list[int | str] | None = None
    version_str: str = ""
    metrics_children: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.entry.name

    @property
    def spec(self) -> ModelSpec:
        return self.entry.spec

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
            **self._io(),
        }

    def _io(self) -> dict[str, Any]:
        spec, batcher = self.spec, self.batcher
        if batcher is None:
            return {
                "inputs": {"type": spec.input.type, "max_chars": spec.input.max_chars},
                "generation": spec.generation.model_dump() if spec.generation else None,
                "endpoint": "/v1/requests",
            }
        return {
            "inputs": {"features": spec.input.features, "example": spec.input.example},
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


class ModelRegistry:
    """Loads the configured models from the repository and hands out ready ones."""

    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self.settings = settings
        self.metrics = metrics
        self.repository = ModelRepository(settings.models_dir)
        self._models: dict[str, LoadedModel] = {}
        self._expected: list[str] = []
        self.default_name: str | None = settings.default_model
        self.failure: str | None = None

    # ------------------------------------------------------------------ lookups
    def get(self, name: str) -> LoadedModel:
        """The ready version of ``name``; 404 if unknown, 503 if not ready yet."""
        loaded = self._models.get(name)
        if loaded is None:
            if name in self._expected:
                raise ModelNotReady(f"model {name!r} is still loading", retry_after=1)
            known = ", ".join(sorted(self._expected)) or "none"
            raise ModelNotFound(f"model {name!r} is not served here (served models: {known})")
        if loaded.state is not ModelState.READY:
            raise ModelNotReady(
                f"model {name!r} is {loaded.state.value}"
                + (f": {loaded.error}" if loaded.error else ""),
                retry_after=1,
            )
        return loaded

    def get_default(self) -> LoadedModel:
        if self.default_name is None:
            raise ModelNotFound("no default model is configured (set INFERD_DEFAULT_MODEL)")
        return self.get(self.default_name)

    def find(self, name: str) -> LoadedModel | None:
        """The entry for ``name`` whatever its state."""
        return self._models.get(name)

    def all(self) -> list[LoadedModel]:
        return [self._models[name] for name in sorted(self._models)]

    @property
    def expected(self) -> list[str]:
        return list(self._expected)

    @property
    def ready(self) -> bool:
        """True when every configured model is loaded, warmed up and serving."""
        return bool(self._expected) and all(
            (m := self._models.get(name)) is not None and m.state is ModelState.READY
            for name in self._expected
        )

    # ------------------------------------------------------------------ lifecycle
    def plan(self) -> list[ModelEntry]:
        """Read the repository and decide what to serve; raises ConfigError when it is wrong."""
        entries = self.repository.entries(self.settings.models)
        if not entries:
            raise ModelLoadError(
                f"no models in {self.repository.root}; run `inferd models train-demo` to create "
                "the demo models"
            )
        self._expected = [entry.name for entry in entries]
        if self.default_name is None:
            self.default_name = "iris" if "iris" in self._expected else self._expected[0]
        elif self.default_name not in self._expected:
            raise ModelLoadError(
                f"default model {self.default_name!r} is not among the served models "
                f"({', '.join(self._expected)})"
            )
        return entries

    async def load_all(self, entries: list[ModelEntry] | None = None) -> None:
        """Load the planned models one after the other; the first failure raises."""
        for entry in entries if entries is not None else self.plan():
            await self.load(entry, entry.latest)

    async def load(self, entry: ModelEntry, version: int) -> LoadedModel:
        """Load, validate and warm up one version, then start serving it."""
        s, spec = self.settings, entry.spec
        b = spec.batching
        model = create_model(spec, version, entry.artifact(version))
        vstr = str(version)
        m = self.metrics
        children = {
            "latency": m.request_latency.labels(spec.name, vstr),
            "prediction": m.prediction_value.labels(spec.name, vstr),
            "timeouts": m.request_timeouts.labels(spec.name, vstr),
            "disconnects": m.client_disconnects.labels(spec.name, vstr),
        }
        batch_size = m.batch_size.labels(spec.name, vstr)
        batch_latency = m.batch_latency.labels(spec.name, vstr)

        def on_batch(rows: int, seconds: float) -> None:
            batch_size.observe(rows)
            batch_latency.observe(seconds)

        def on_reject(reason: str) -> None:
            m.queue_rejections.labels(spec.name, vstr, reason).inc()

        batcher: Batcher[FloatArray, FloatArray] | None = None
        if not spec.generates_text:
            batcher = Batcher(
                model.predict,
                name=f"{spec.name}:{version}",
                max_batch_size=b.max_batch_size or s.max_batch_size,
                window=(b.batch_window_ms if b.batch_window_ms is not None else s.batch_window_ms)
                / 1000.0,
                max_queue_size=b.max_queue_size or s.max_queue_size,
                shed_threshold=s.shed_threshold,
                concurrency=b.concurrency or s.batch_concurrency,
                retry_after=s.retry_after_s,
                on_batch=on_batch,
                on_reject=on_reject,
            )
        loaded = LoadedModel(
            entry=entry,
            version=version,
            model=model,
            batcher=batcher,
            version_str=vstr,
            metrics_children=children,
        )
        self._models[spec.name] = loaded
        m.model_ready.labels(spec.name, vstr).set(0)
        started = time.perf_counter()
        try:
            if batcher is None:
                await run_blocking(self._load_streaming, loaded)
            else:
                await run_blocking(self._load_and_check, loaded)
                await batcher.on_each_worker(lambda: self._warm_up(loaded))
        except Exception as exc:
            loaded.state = ModelState.FAILED
            loaded.error = exc.message if isinstance(exc, InferdError) else repr(exc)
            m.model_load_failures.labels(spec.name, vstr).inc()
            log.error("model load failed", model=spec.name, version=version, detail=loaded.error)
            if isinstance(exc, InferdError):
                raise
            raise ModelLoadError(f"model {spec.name!r} version {version}: {exc!r}") from exc
        loaded.load_seconds = time.perf_counter() - started
        loaded.loaded_at = time.time()
        if batcher is not None:
            batcher.start()
            m.queue_depth.labels(spec.name, vstr).set_function(lambda: batcher.depth)
        m.model_load_seconds.labels(spec.name, vstr).set(loaded.load_seconds)
        m.model_version_info.labels(spec.name, vstr, spec.runtime).set(1)
        m.model_ready.labels(spec.name, vstr).set(1)
        loaded.state = ModelState.READY
        log.info(
            "model ready",
            model=spec.name,
            version=version,
            runtime=spec.runtime,
            load_ms=round(loaded.load_seconds * 1000, 2),
            fast_path=getattr(model, "fast_path", None),
        )
        return loaded

    @staticmethod
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

    @staticmethod
    def _load_streaming(loaded: LoadedModel) -> None:
        """Blocking: load a text model and run one short generation through it."""
        model = loaded.model
        model.load()
        warm_up = getattr(model, "warm_up", None)
        if callable(warm_up):
            warm_up()

    @staticmethod
    def _warm_up(loaded: LoadedModel) -> None:
        """Blocking: one full batch through the model, in the thread that will serve it."""
        loaded.model.predict(sample_batch(loaded.spec, _rows(loaded)))

    async def stop(self, grace: float = 5.0) -> None:
        """Drain every batcher within ``grace`` seconds and unload the models."""
        models = list(self._models.values())
        for loaded in models:
            loaded.state = ModelState.UNLOADING
        await asyncio.gather(
            *(m.batcher.stop(grace) for m in models if m.batcher is not None),
            return_exceptions=True,
        )
        for loaded in models:
            self.metrics.model_ready.labels(loaded.name, loaded.version_str).set(0)
            self.metrics.model_version_info.labels(
                loaded.name, loaded.version_str, loaded.spec.runtime
            ).set(0)
            loaded.model.unload()
        self._models.clear()


def _rows(loaded: LoadedModel) -> int:
    return loaded.batcher.max_batch_size if loaded.batcher is not None else 1
