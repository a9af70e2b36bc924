"""The sliding window of one served version: bin counts over a ring of time buckets, and PSI.

No row is kept. The window is ``buckets`` slots of ``seconds / buckets`` each; a slot holds,
for the rows that arrived in its time span, the count of each feature's bins, each feature's
sum and sum of squares, the count of each predicted class (or value bin) and the sum of the
confidences. A slot whose time span has left the window is cleared when its turn comes again,
so memory is fixed: ``buckets x (bins of all features + classes + 2 x features + 3)`` numbers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from inferd.monitoring.reference import Bins

__all__ = ["EPSILON", "Totals", "Window", "psi"]

EPSILON = 1e-4
"""Shares below this are raised to it before PSI is computed (an empty bin would be log 0)."""

IntArray = npt.NDArray[np.int64]
FloatArray = npt.NDArray[np.float64]


def psi(expected: FloatArray, counts: IntArray | FloatArray) -> float:
    """Population stability index of observed ``counts`` against ``expected`` shares:
    ``sum((a - e) * ln(a / e))`` over the bins, ``a`` and ``e`` floored at :data:`EPSILON`.
    NaN when nothing was observed."""
    total = float(np.sum(counts))
    if total <= 0:
        return math.nan
    actual = np.maximum(np.asarray(counts, dtype=np.float64) / total, EPSILON)
    e = np.maximum(expected, EPSILON)
    return float(np.sum((actual - e) * np.log(actual / e)))


@dataclass(frozen=True, slots=True)
class Totals:
    """The window summed over its live slots."""

    inputs: int
    """Input rows binned (a sample of those served when the load is high)."""
    predictions: int
    """Predictions counted (all of them)."""
    bins: IntArray
    """Counts of every feature's bins, one after the other."""
    sums: FloatArray
    squares: FloatArray
    classes: IntArray
    confidence: float
    """Sum of the confidences of the predictions counted."""
    oldest: float | None
    """Seconds since the oldest rows in the window were counted."""


class Window:
    """Bin counts of one version's inputs and predictions over the last ``seconds``."""

    def __init__(
        self,
        features: list[Bins],
        prediction_bins: int,
        seconds: float,
        buckets: int,
    ) -> None:
        self.features = features
        self.seconds = seconds
        self.buckets = buckets
        self.width = seconds / buckets
        sizes = [b.size for b in features]
        self.offsets = np.cumsum([0, *sizes])[:-1].astype(np.int64)
        self.n_bins = int(sum(sizes))
        self._epochs = np.full(buckets, -1, dtype=np.int64)
        self._inputs = np.zeros(buckets, dtype=np.int64)
        self._predictions = np.zeros(buckets, dtype=np.int64)
        self._bins = np.zeros((buckets, self.n_bins), dtype=np.int64)
        self._sums = np.zeros((buckets, len(features)), dtype=np.float64)
        self._squares = np.zeros((buckets, len(features)), dtype=np.float64)
        self._classes = np.zeros((buckets, prediction_bins), dtype=np.int64)
        self._confidence = np.zeros(buckets, dtype=np.float64)
        self._first = np.full(buckets, math.inf, dtype=np.float64)

    def _slot(self, now: float) -> int:
        epoch = int(now // self.width)
        slot = epoch % self.buckets
        if self._epochs[slot] != epoch:  # its time span left the window: start it afresh
            self._epochs[slot] = epoch
            self._inputs[slot] = self._predictions[slot] = 0
            self._bins[slot] = 0
            self._sums[slot] = self._squares[slot] = 0.0
            self._classes[slot] = 0
            self._confidence[slot] = 0.0
            self._first[slot] = math.inf
        if now < self._first[slot]:
            self._first[slot] = now
        return slot

    def add_inputs(self, rows: FloatArray, now: float) -> None:
        """Count ``rows`` (n x features) into the slot of ``now``."""
        if not len(rows) or not self.features:
            return
        slot = self._slot(now)
        index = np.concatenate(
            [b.index(rows[:, i]) + self.offsets[i] for i, b in enumerate(self.features)]
        )
        self._bins[slot] += np.bincount(index, minlength=self.n_bins)
        self._sums[slot] += rows.sum(axis=0)
        self._squares[slot] += np.einsum("ij,ij->j", rows, rows)
        self._inputs[slot] += len(rows)

    def add_predictions(self, bins: IntArray, confidence: float, now: float) -> None:
        """Count predictions falling in ``bins`` (class index, or value bin) and the sum of
        their confidences."""
        if not len(bins):
            return
        slot = self._slot(now)
        if self._classes.shape[1]:
            self._classes[slot] += np.bincount(bins, minlength=self._classes.shape[1])
        self._confidence[slot] += confidence
        self._predictions[slot] += len(bins)

    def totals(self, now: float) -> Totals:
        epoch = int(now // self.width)
        live = self._epochs > epoch - self.buckets
        held = live & ((self._inputs > 0) | (self._predictions > 0))
        oldest = now - float(self._first[held].min()) if held.any() else None
        return Totals(
            inputs=int(self._inputs[live].sum()),
            predictions=int(self._predictions[live].sum()),
            bins=self._bins[live].sum(axis=0),
            sums=self._sums[live].sum(axis=0),
            squares=self._squares[live].sum(axis=0),
            classes=self._classes[live].sum(axis=0),
            confidence=float(self._confidence[live].sum()),
            oldest=oldest,
        )

    def feature_counts(self, totals: Totals, i: int) -> IntArray:
        start = int(self.offsets[i])
        return totals.bins[start : start + self.features[i].size]
