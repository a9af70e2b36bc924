"""Runtime dispatch: which class serves a ``model.toml``, and how a version is checked at load.

Each runtime lives in its own module; this is the one place that maps ``runtime = "..."`` to it,
builds the sample batch used for validation and warm-up, and checks what the model answered.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from inferd.errors import ModelLoadError
from inferd.models.base import FloatArray, Model
from inferd.models.python import PythonModel
from inferd.models.sklearn import SklearnModel
from inferd.models.spec import ModelSpec

__all__ = ["create_model", "sample_batch", "validate_output"]


def create_model(spec: ModelSpec, version: int, path: Path) -> Model:
    """The runtime object for one version of a model (not loaded yet)."""
    if spec.runtime == "sklearn":
        return SklearnModel(spec, version, path)
    if spec.runtime == "python":
        return PythonModel(spec, version, path)
    if spec.runtime == "transformers":
        from inferd.models.textgen import TextGenerationModel

        return TextGenerationModel(spec, version, path)
    raise ModelLoadError(f"model {spec.name!r}: unknown runtime {spec.runtime!r}")


def sample_batch(spec: ModelSpec, rows: int) -> FloatArray:
    """A batch of ``rows`` typical inputs, for the load-time check and the warm-up."""
    row = spec.input.example or [0.0] * spec.n_features
    return np.tile(np.asarray(row, dtype=np.float64), (rows, 1))


def validate_output(
    spec: ModelSpec,
    version: int,
    classes: list[int | str] | None,
    batch: FloatArray,
    out: FloatArray,
) -> None:
    """Raise ModelLoadError unless ``out`` is what ``spec`` promises for ``batch``."""
    where = f"model {spec.name!r} version {version}"
    n = batch.shape[0]
    if spec.task == "classification":
        n_classes = len(classes or ())
        if out.shape != (n, n_classes):
            raise ModelLoadError(
                f"{where}: warm-up batch of {n} rows gave shape {out.shape}, "
                f"expected ({n}, {n_classes})"
            )
        if not np.allclose(out.sum(axis=1), 1.0, atol=1e-6):
            raise ModelLoadError(f"{where}: warm-up probabilities do not sum to 1")
    elif out.shape[0] != n:
        raise ModelLoadError(f"{where}: warm-up batch of {n} rows gave {out.shape[0]} outputs")
    if not np.all(np.isfinite(out)):
        raise ModelLoadError(f"{where}: warm-up batch gave non-finite outputs")
