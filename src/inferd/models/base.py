"""The Model seam: what every runtime implements, and the per-row result it gives back."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from inferd.models.spec import ModelSpec

__all__ = ["FloatArray", "Model"]

FloatArray = npt.NDArray[np.float64]


@runtime_checkable
class Model(Protocol):
    """A loaded model version. ``predict`` is blocking and is only ever called off the event loop.

    For a classifier, ``predict`` takes rows of shape ``(n, n_features)`` and returns class
    probabilities of shape ``(n, n_classes)``; for a regressor, values of shape ``(n,)``.
    """

    spec: ModelSpec
    version: int

    def load(self) -> None:
        """Read the artifact and check it against the spec; raise ModelLoadError if it is wrong."""

    def predict(self, batch: FloatArray) -> FloatArray:
        """Compute one batch."""

    def classes(self) -> list[int | str] | None:
        """Class values in the order of the probability columns (classifiers), else None."""

    def unload(self) -> None:
        """Release what ``load`` took."""
