"""Runtime dispatch: which class serves a ``model.toml``, and how a version is checked at load.

Each runtime lives in its own module; this is the one place that maps ``runtime = "..."`` to it,
builds the sample batch used for validation and warm-up, and checks what the model answered.

Process-wide runtime options (device, thread counts) come from the settings through
:func:`configure`, which the app calls once: torch's thread count is process-wide anyway.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from inferd.errors import ModelLoadError
from inferd.models.base import FloatArray, Model
from inferd.models.onnx import OnnxModel
from inferd.models.python import PythonModel
from inferd.models.sklearn import SklearnModel
from inferd.models.spec import ModelSpec
from inferd.models.vision import TorchImageClassifier

__all__ = [
    "RuntimeOptions",
    "configure",
    "create_model",
    "default_concurrency",
    "sample_batch",
    "validate_output",
]


@dataclass(frozen=True, slots=True)
class RuntimeOptions:
    """Settings the runtimes read when a model is created (see :class:`inferd.Settings`)."""

    device: str = "auto"
    torch_threads: int = 0
    onnx_intra_op_threads: int = 0
    onnx_inter_op_threads: int = 0

    @classmethod
    def from_settings(cls, settings: Any) -> RuntimeOptions:
        return cls(
            device=settings.device,
            torch_threads=settings.torch_threads,
            onnx_intra_op_threads=settings.onnx_intra_op_threads,
            onnx_inter_op_threads=settings.onnx_inter_op_threads,
        )


_options = RuntimeOptions()


def configure(options: RuntimeOptions) -> None:
    """Set the options that models created from now on use."""
    global _options
    _options = options


def default_concurrency(spec: ModelSpec) -> int | None:
    """Batches a runtime runs at once when neither ``model.toml`` nor the settings say.

    A torch image model on a CPU answers more images per second as a few batches side by side,
    each on a few threads, than as one batch on every core: a thread held up for a moment by
    HTTP or decoding stalls only its own batch (see docs/vision.md). Others keep the settings'
    ``batch_concurrency`` (None)."""
    if spec.runtime == "torch":
        return max(1, min(4, os.cpu_count() or 1))
    return None


def create_model(
    spec: ModelSpec,
    version: int,
    path: Path,
    options: RuntimeOptions | None = None,
    *,
    concurrency: int = 1,
) -> Model:
    """The runtime object for one version of a model (not loaded yet). ``concurrency`` is how
    many batches its batcher runs at once (torch shares the CPU's threads among them)."""
    opts = options if options is not None else _options
    if spec.runtime == "onnx":
        return OnnxModel(
            spec,
            version,
            path,
            intra_op_threads=opts.onnx_intra_op_threads,
            inter_op_threads=opts.onnx_inter_op_threads,
            device=opts.device,
        )
    if spec.runtime == "torch":
        return TorchImageClassifier(
            spec,
            version,
            path,
            device=opts.device,
            threads=opts.torch_threads,
            concurrency=concurrency,
        )
    if spec.runtime == "sklearn":
        return SklearnModel(spec, version, path)
    if spec.runtime == "python":
        return PythonModel(spec, version, path)
    if spec.runtime == "transformers":
        from inferd.models.textgen import TextGenerationModel

        return TextGenerationModel(spec, version, path)
    raise ModelLoadError(f"model {spec.name!r}: unknown runtime {spec.runtime!r}")


def sample_batch(spec: ModelSpec, rows: int) -> FloatArray:
    """A batch of ``rows`` typical inputs, for the load-time check and the warm-up.

    Image models get mid-grey pictures already prepared: zeros after normalization, float32
    as the image path produces them.
    """
    if spec.takes_images:
        images: Any = np.zeros((rows, *spec.image.input_shape), dtype=np.float32)
        return images  # type: ignore[no-any-return]
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
        if not np.allclose(out.sum(axis=1), 1.0, atol=1e-4):
            hint = (
                "; if the model outputs logits, set [output] softmax = true"
                if spec.runtime == "onnx"
                else ""
            )
            raise ModelLoadError(f"{where}: warm-up probabilities do not sum to 1{hint}")
    elif out.shape[0] != n:
        raise ModelLoadError(f"{where}: warm-up batch of {n} rows gave {out.shape[0]} outputs")
    if not np.all(np.isfinite(out)):
        raise ModelLoadError(f"{where}: warm-up batch gave non-finite outputs")
