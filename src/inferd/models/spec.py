"""The ``model.toml`` schema: what a model is, what it takes and how it is batched."""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from inferd.errors import ModelLoadError

__all__ = ["BatchingSpec", "InputSpec", "ModelSpec", "OutputSpec", "load_spec"]

_STRICT = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class InputSpec(BaseModel):
    """Shape of one input row."""

    model_config = _STRICT

    features: list[str] = Field(min_length=1)
    """Feature names, in the order the model expects them; a request sends this many numbers."""

    example: list[float] | None = None
    """One typical row, used for the warm-up batch and in the API documentation."""

    @model_validator(mode="after")
    def _example_matches(self) -> InputSpec:
        if self.example is not None and len(self.example) != len(self.features):
            raise ValueError(
                f"input.example has {len(self.example)} values but input.features names "
                f"{len(self.features)}"
            )
        return self


class OutputSpec(BaseModel):
    """What the model answers."""

    model_config = _STRICT

    labels: list[str] | None = None
    """Class names, in the order of the model's classes (classification)."""


class BatchingSpec(BaseModel):
    """Per-model overrides of the server-wide batching settings."""

    model_config = _STRICT

    max_batch_size: int | None = Field(default=None, ge=1)
    batch_window_ms: float | None = Field(default=None, ge=0)
    max_queue_size: int | None = Field(default=None, ge=1)
    concurrency: int | None = Field(default=None, ge=1, le=64)


class ModelSpec(BaseModel):
    """One ``models/<name>/model.toml``."""

    model_config = _STRICT

    name: str
    runtime: Literal["sklearn", "python"] = "sklearn"
    """``sklearn``: a joblib artifact; ``python``: the class named by ``class``."""
    class_: str | None = Field(default=None, alias="class")
    """For ``runtime = "python"``: ``package.module:ClassName`` implementing the Model protocol."""
    task: Literal["classification", "regression"] = "classification"
    description: str = ""
    artifact: str | None = None
    """File name of the artifact inside each version folder (``model.joblib`` for sklearn;
    optional for python, whose class then gets the version folder)."""
    input: InputSpec
    output: OutputSpec = OutputSpec()
    batching: BatchingSpec = BatchingSpec()

    @property
    def n_features(self) -> int:
        return len(self.input.features)

    @property
    def artifact_name(self) -> str | None:
        """The artifact file in a version folder; None when the folder itself is the artifact."""
        if self.artifact is not None:
            return self.artifact
        return "model.joblib" if self.runtime == "sklearn" else None


def load_spec(path: Path, name: str) -> ModelSpec:
    """Read and validate a ``model.toml``; every problem names the file."""
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as exc:
        raise ModelLoadError(f"model {name!r}: {path} is missing") from exc
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ModelLoadError(f"model {name!r}: cannot read {path}: {exc}") from exc
    raw.setdefault("name", name)
    if raw["name"] != name:
        raise ModelLoadError(
            f"model {name!r}: {path} says name = {raw['name']!r}; it must match its folder name"
        )
    try:
        return ModelSpec.model_validate(raw)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ModelLoadError(f"model {name!r}: invalid {path}: {problems}") from exc
