"""A registry of scripted test models and a :class:`ModelExecutor` on it, for unit tests of the
long-running path (the worker, the runner and the request service)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from inferd.jobs.runner import ModelExecutor
from inferd.metrics import Metrics
from inferd.models.registry import ModelRegistry
from inferd.settings import Settings
from tests.support.models import write_scripted_model, write_streaming_model

__all__ = ["STREAMER", "TABULAR", "executor_on"]

TABULAR = "tab"
"""A :class:`~tests.support.models.ScriptedModel`: 4 features, 3 classes, batched."""
STREAMER = "stream"
"""A :class:`~tests.support.models.ScriptedStreamer`: string input, ``chunks`` parameter."""


@asynccontextmanager
async def executor_on(
    tmp_path: Path, job_timeout: float = 5.0, **streamer: Any
) -> AsyncIterator[ModelExecutor]:
    """Both models loaded from a repository under ``tmp_path``; stopped on the way out.
    ``streamer`` is the streaming model's behaviour (``chunk_delay_s``, ``state_dir``)."""
    repo = tmp_path / "models"
    write_scripted_model(repo, TABULAR)
    write_streaming_model(repo, STREAMER, **streamer)
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        models_dir=repo,
        data_dir=tmp_path / "data",
        gc_freeze=False,
        drift_enabled=False,
    )
    registry = ModelRegistry(settings, Metrics())
    await registry.load_all(registry.plan())
    try:
        yield ModelExecutor(registry, timeout=job_timeout)
    finally:
        await registry.stop(grace=1.0)
