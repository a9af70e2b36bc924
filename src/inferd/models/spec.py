"""The ``model.toml`` schema: what a model is, what it takes and how it is batched.

Tabular models (``classification``, ``regression``) take rows of named features. Text models
(``text-generation``) take one string and are configured by a ``[generation]`` table; their
version folder is what the runtime reads (a ``from_pretrained`` folder), so ``artifact`` is
left out::

    runtime = "transformers"
    task = "text-generation"

    [input]
    type = "text"
    max_chars = 8192

    [generation]
    max_new_tokens = 64
    temperature = 0.0
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from inferd.errors import ModelLoadError

__all__ = ["BatchingSpec", "GenerationSpec", "InputSpec", "ModelSpec", "OutputSpec", "load_spec"]

_STRICT = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class InputSpec(BaseModel):
    """What one request carries: a row of named features (``tabular``) or a string (``text``)."""

    model_config = _STRICT

    type: Literal["tabular", "text"] = "tabular"
    """``tabular`` for classification and regression; ``text`` for text generation (the
    default when ``task = "text-generation"``)."""

    # An empty list rather than None for text input, so that tabular code can keep treating
    # ``features`` as a plain list; the ``tabular`` check below still requires at least one.
    features: list[str] = Field(default_factory=list)
    """Feature names, in the order the model expects them; a request sends this many numbers."""

    example: list[float] | None = None
    """One typical row, used for the warm-up batch and in the API documentation."""

    max_chars: int = Field(default=8192, ge=1, le=1_000_000)
    """Text input only: the longest prompt accepted, in characters."""

    @model_validator(mode="after")
    def _fits_its_type(self) -> InputSpec:
        if self.type == "text":
            if self.features:
                raise ValueError("input.features is for tabular input; text input has none")
            if self.example is not None:
                raise ValueError("input.example is for tabular input; text input has none")
            return self
        if not self.features:
            raise ValueError("input.features must name at least one feature")
        if "max_chars" in self.model_fields_set:
            raise ValueError('input.max_chars is for text input (type = "text")')
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


class GenerationSpec(BaseModel):
    """``[generation]``: defaults and limits of text generation.

    A request's ``parameters`` override ``max_new_tokens``, ``temperature``, ``top_k`` and
    ``top_p`` within these limits; its ``stop`` strings are added to the ones listed here.
    """

    model_config = _STRICT

    max_new_tokens: int = Field(default=64, ge=1)
    """Tokens generated when a request does not say."""
    max_new_tokens_limit: int = Field(default=1024, ge=1)
    """The most tokens any request may ask for."""
    temperature: float = Field(default=0.0, ge=0.0)
    """0 picks the most likely token every time (greedy); above 0 samples."""
    top_k: int = Field(default=0, ge=0)
    """Sample among the ``top_k`` most likely tokens only; 0 means no limit."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    """Sample among the most likely tokens whose probabilities add up to ``top_p``."""
    stop: list[str] = Field(default_factory=list, max_length=16)
    """Generation ends before the first of these strings; it is not part of the output."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto``: the GPU when one is available, else the CPU."""

    @model_validator(mode="after")
    def _consistent(self) -> GenerationSpec:
        if self.max_new_tokens > self.max_new_tokens_limit:
            raise ValueError(
                f"generation.max_new_tokens ({self.max_new_tokens}) is over "
                f"generation.max_new_tokens_limit ({self.max_new_tokens_limit})"
            )
        if not math.isfinite(self.temperature):
            raise ValueError("generation.temperature must be a finite number")
        if any(not s for s in self.stop):
            raise ValueError("generation.stop strings must not be empty")
        return self


class ModelSpec(BaseModel):
    """One ``models/<name>/model.toml``."""

    model_config = _STRICT

    name: str
    runtime: Literal["sklearn", "python", "transformers"] = "sklearn"
    """``sklearn``: a joblib artifact; ``python``: the class named by ``class``;
    ``transformers``: a causal language model and its tokenizer saved with
    ``save_pretrained`` (the default for ``task = "text-generation"``)."""
    class_: str | None = Field(default=None, alias="class")
    """For ``runtime = "python"``: ``package.module:ClassName`` implementing the Model protocol."""
    task: Literal["classification", "regression", "text-generation"] = "classification"
    description: str = ""
    artifact: str | None = None
    """File name of the artifact inside each version folder (``model.joblib`` for sklearn;
    optional for python, whose class then gets the version folder; usually left out for
    transformers, which reads the version folder itself)."""
    input: InputSpec
    """Required for tabular tasks; text generation defaults to ``type = "text"``."""
    output: OutputSpec = OutputSpec()
    batching: BatchingSpec = BatchingSpec()
    generation: GenerationSpec = GenerationSpec()
    """Text generation only."""

    @model_validator(mode="before")
    @classmethod
    def _text_defaults(cls, data: Any) -> Any:
        # A text model needs no [input] table and no runtime line: fill in what can only be
        # right, before field validation, so that tabular specs keep their errors unchanged.
        if not isinstance(data, dict) or data.get("task") != "text-generation":
            return data
        data = dict(data)
        data.setdefault("runtime", "transformers")
        raw_input = data.get("input")
        if raw_input is None:
            data["input"] = {"type": "text"}
        elif isinstance(raw_input, dict) and "type" not in raw_input:
            data["input"] = {**raw_input, "type": "text"}
        return data

    @model_validator(mode="after")
    def _task_fits(self) -> ModelSpec:
        if self.task == "text-generation":
            if self.runtime not in ("transformers", "python"):
                raise ValueError(
                    f'task "text-generation" needs runtime "transformers" or "python", '
                    f"not {self.runtime!r}"
                )
            if self.input.type != "text":
                raise ValueError('task "text-generation" needs text input (input.type = "text")')
            return self
        if self.runtime == "transformers":
            raise ValueError(
                f'runtime "transformers" serves task "text-generation" only, not {self.task!r}'
            )
        if self.input.type != "tabular":
            raise ValueError(f"task {self.task!r} needs tabular input with input.features")
        if "generation" in self.model_fields_set:
            raise ValueError('[generation] is for task "text-generation" only')
        return self

    @property
    def generates_text(self) -> bool:
        """True for text models, served by streaming requests instead of ``/predict``."""
        return self.task == "text-generation"

    @property
    def n_features(self) -> int:
        """Numbers in one input row (0 for text input)."""
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
