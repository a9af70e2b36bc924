"""The drift monitor: what served versions are fed and answer, against their reference.

The request path calls :meth:`Monitor.observe` once per answered batch: it appends the batch's
input and output arrays to a list and returns (well under a microsecond). Every
``drift_interval_seconds`` (and whenever the list holds :data:`FLUSH_ROWS` rows, which bounds
its memory) :meth:`Monitor.update` takes the list, and for each version, all at once with
numpy:

* counts every prediction by class (``inference_predicted_class_total``) and sums the
  confidences: exact, whatever the load;
* bins the input rows into the version's :class:`~inferd.monitoring.window.Window`; when more
  than ``drift_max_values_per_update`` values (rows x features) arrived, a uniform random
  sample of the rows is binned instead, which bounds the CPU drift costs under load and leaves
  the shares (and so PSI) unbiased;
* computes PSI per feature and of the predictions, and sets the gauges.

Versions are tracked by identity: a version loaded again starts with an empty window, and the
gauges of a version that is unloaded are removed.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from inferd.logs import get_logger
from inferd.metrics import Metrics
from inferd.monitoring.reference import Bins, LoadedReference
from inferd.monitoring.window import Totals, Window, psi

if TYPE_CHECKING:
    from inferd.models.loading import LoadedModel
    from inferd.settings import Settings

__all__ = ["FLUSH_ROWS", "Monitor", "level"]

log = get_logger("inferd.monitoring")

FLUSH_ROWS = 65_536
"""Rows held between two updates at most; reaching it runs an update at once."""

_GONE = ("unloaded", "failed")


def level(value: float) -> str:
    """The usual reading of a PSI: under 0.1 ``stable``, up to 0.25 ``moderate``, above
    ``significant`` (NaN: ``unknown``)."""
    if math.isnan(value):
        return "unknown"
    if value < 0.1:
        return "stable"
    return "moderate" if value <= 0.25 else "significant"


@dataclass(eq=False)
class _Version:
    """The monitor's state of one loaded version."""

    loaded: LoadedModel
    reference: LoadedReference | None
    window: Window
    labels: list[str] | None
    """Class labels, in the order of the model's probability columns (classifiers)."""
    predicted: Bins | None
    """The reference's bins of the predictions (None: no prediction drift)."""
    counters: list[Any]
    """``inference_predicted_class_total`` children, one per label."""
    broken: str | None = None
    features: list[str] = field(default_factory=list)
    exported: set[str] = field(default_factory=set)
    """Feature names whose gauge is set, so that a window gone quiet removes them."""

    @property
    def key(self) -> tuple[str, str]:
        return self.loaded.name, self.loaded.version_str


class Monitor:
    """Drift and prediction monitoring of every served version of one process."""

    def __init__(
        self,
        settings: Settings,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        seed: int | None = None,
    ) -> None:
        self.window_seconds = settings.drift_window_seconds
        self.buckets = settings.drift_buckets
        self.interval = settings.drift_interval_seconds
        self.min_rows = settings.drift_min_rows
        self.max_values = settings.drift_max_values_per_update
        self.metrics = metrics
        self.clock = clock
        self._rng = np.random.default_rng(seed)
        self._pending: list[tuple[LoadedModel, Any, Any]] = []
        self._held = 0
        self._versions: dict[LoadedModel, _Version] = {}
        self.sampled_rows = 0
        """Input rows left out of the binning by sampling, since start-up."""
        self.busy_seconds = 0.0
        """Time spent binning and exporting since start-up (updates, and early flushes)."""

    # ------------------------------------------------------------------ request path
    def observe(self, loaded: LoadedModel, rows: Any, outputs: Any) -> None:
        """Record one answered batch: ``rows`` as the model got them (n x features for a
        tabular model; anything else is not kept), ``outputs`` as it answered. Costs a list
        append; never raises."""
        try:
            n = len(outputs)
            if rows is not None and getattr(rows, "ndim", 0) != 2:
                rows = None  # pictures and tensors: only the predictions are watched
            self._pending.append((loaded, rows, outputs))
            self._held += n
            if self._held >= FLUSH_ROWS:
                started = time.perf_counter()
                self._ingest(self.clock())
                self.busy_seconds += time.perf_counter() - started
        except Exception as exc:  # monitoring must never fail a request
            log.warning("drift monitor: could not record a batch", detail=repr(exc))

    # ------------------------------------------------------------------ updates
    async def run(self) -> None:
        """Update every ``drift_interval_seconds`` until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                self.update()
            except Exception as exc:  # a bad update must not end the monitor
                log.warning("drift monitor: update failed", detail=repr(exc), exc_info=exc)

    def update(self) -> None:
        """Bin what was observed, compute PSI and set the gauges."""
        started = time.perf_counter()
        now = self.clock()
        self._ingest(now)
        for version in list(self._versions.values()):
            if version.loaded.state in _GONE:
                self._forget(version)
            else:
                self._export(version, version.window.totals(now))
        self.busy_seconds += time.perf_counter() - started

    def _ingest(self, now: float) -> None:
        pending, self._pending, self._held = self._pending, [], 0
        if not pending:
            return
        grouped: dict[LoadedModel, list[tuple[Any, Any]]] = {}
        for loaded, rows, outputs in pending:
            grouped.setdefault(loaded, []).append((rows, outputs))
        for loaded, batches in grouped.items():
            version = self._version(loaded)
            if version.broken is None:
                try:
                    self._add(version, batches, now)
                except Exception as exc:
                    version.broken = f"{type(exc).__name__}: {exc}"
                    log.warning(
                        "drift monitor: this version's batches cannot be read; it is not "
                        "watched until it loads again",
                        model=loaded.name,
                        version=loaded.version,
                        detail=version.broken,
                    )

    def _add(self, version: _Version, batches: list[tuple[Any, Any]], now: float) -> None:
        window = version.window
        outputs = np.concatenate([np.asarray(out) for _, out in batches])
        if version.labels is not None:
            if outputs.ndim != 2 or outputs.shape[1] != len(version.labels):
                raise ValueError(
                    f"outputs of shape {outputs.shape}; expected (rows, {len(version.labels)})"
                )
            best = outputs.argmax(axis=1)
            confidence = float(outputs.max(axis=1).sum())
            counts = np.bincount(best, minlength=len(version.labels))
            for counter, n in zip(version.counters, counts.tolist(), strict=True):
                if n:
                    counter.inc(n)
            window.add_predictions(best, confidence, now)
        else:
            values = outputs.reshape(len(outputs), -1)[:, 0].astype(np.float64)
            bins = (
                version.predicted.index(values)
                if version.predicted is not None
                else np.zeros(len(values), dtype=np.int64)
            )
            window.add_predictions(bins, 0.0, now)
        if not window.features:
            return
        width = len(window.features)
        tables = [r for r, _ in batches if r is not None and r.shape[1] == width]
        if not tables:
            return
        rows = np.concatenate(tables).astype(np.float64, copy=False)
        most = max(1, self.max_values // width)
        if len(rows) > most:
            self.sampled_rows += len(rows) - most
            rows = rows[self._rng.choice(len(rows), most, replace=False)]
        window.add_inputs(rows, now)

    def _version(self, loaded: LoadedModel) -> _Version:
        version = self._versions.get(loaded)
        if version is not None:
            return version
        reference = loaded.reference
        usable = reference if reference is not None and reference.enabled else None
        classifier = loaded.spec.task == "classification" and bool(loaded.labels)
        labels = list(loaded.labels or []) if classifier else None
        predicted = usable.predictions if usable is not None else None
        features = list(usable.features.values()) if usable and usable.features else []
        n_predicted = len(labels) if labels is not None else (predicted.size if predicted else 0)
        name, vstr = loaded.name, loaded.version_str
        counters = (
            [self.metrics.predicted_class.labels(name, vstr, label) for label in labels]
            if labels is not None
            else []
        )
        version = _Version(
            loaded=loaded,
            reference=reference,
            window=Window(features, n_predicted, self.window_seconds, self.buckets),
            labels=labels,
            predicted=predicted,
            counters=counters,
            features=list(usable.features) if usable and usable.features else [],
        )
        self._versions[loaded] = version
        return version

    # ------------------------------------------------------------------ gauges
    def _export(self, version: _Version, totals: Totals) -> None:
        m, (name, vstr) = self.metrics, version.key
        if version.labels is not None and totals.predictions:
            m.prediction_confidence.labels(name, vstr).set(totals.confidence / totals.predictions)
        else:
            _remove(m.prediction_confidence, name, vstr)
        usable = version.reference if version.reference and version.reference.enabled else None
        if usable is None:
            return
        m.drift_window_rows.labels(name, vstr).set(totals.inputs)
        window = version.window
        if version.features and totals.inputs >= self.min_rows:
            values = []
            for i, feature in enumerate(version.features):
                value = psi(window.features[i].expected, window.feature_counts(totals, i))
                m.feature_drift.labels(name, vstr, feature).set(value)
                values.append(value)
            version.exported = set(version.features)
            m.input_drift.labels(name, vstr).set(max(values))
        elif version.exported:
            for feature in version.exported:
                _remove(m.feature_drift, name, vstr, feature)
            version.exported = set()
            _remove(m.input_drift, name, vstr)
        if version.predicted is not None and totals.predictions >= self.min_rows:
            value = psi(version.predicted.expected, totals.classes)
            m.prediction_drift.labels(name, vstr).set(value)
        else:
            _remove(m.prediction_drift, name, vstr)
        if usable.mean_confidence is not None:
            m.reference_confidence.labels(name, vstr).set(usable.mean_confidence)

    def _forget(self, version: _Version) -> None:
        del self._versions[version.loaded]
        if any(v.key == version.key for v in self._versions.values()):
            return  # the same version loaded again owns these series now
        m, (name, vstr) = self.metrics, version.key
        for feature in version.features:
            _remove(m.feature_drift, name, vstr, feature)
        for gauge in (
            m.input_drift,
            m.prediction_drift,
            m.prediction_confidence,
            m.reference_confidence,
            m.drift_window_rows,
        ):
            _remove(gauge, name, vstr)

    # ------------------------------------------------------------------ reports
    def report(self, loaded: LoadedModel) -> dict[str, Any]:
        """One version's drift, as ``GET /v1/models/{name}/drift`` shows it (call
        :meth:`update` first for figures up to this moment)."""
        version = self._version(loaded)
        totals = version.window.totals(self.clock())
        reference = version.reference
        out: dict[str, Any] = {
            "version": loaded.version_str,
            "reference": reference.describe() if reference is not None else None,
            "window": {
                "seconds": self.window_seconds,
                "buckets": self.buckets,
                "rows": totals.inputs,
                "predictions": totals.predictions,
                "age_seconds": None if totals.oldest is None else round(totals.oldest, 3),
                "min_rows": self.min_rows,
                "enough_rows": totals.inputs >= self.min_rows,
            },
        }
        if version.broken:
            out["error"] = version.broken
        if version.labels is not None:
            out["predictions"] = self._prediction_report(version, totals)
        if reference is None or not reference.enabled:
            out["status"] = "no_reference"
            out["detail"] = (
                reference.detail
                if reference is not None
                else "drift is watched for tabular and image models, not this one"
            )
            return out
        features = [self._feature_report(version, totals, i) for i in range(len(version.features))]
        values = [f["psi"] for f in features if f["psi"] is not None]
        worst = max(features, key=lambda f: f["psi"] or -1.0) if values else None
        out["input_drift"] = {
            "psi": max(values) if values else None,
            "mean_psi": float(np.mean(values)) if values else None,
            "feature": worst["name"] if worst else None,
            "level": level(max(values)) if values else "unknown",
        }
        out["features"] = features
        if version.labels is None and version.predicted is not None:
            out["predictions"] = self._prediction_report(version, totals)
        enough = totals.inputs >= self.min_rows
        out["status"] = (
            "insufficient_data"
            if not enough
            else ("drift" if out["input_drift"]["level"] == "significant" else "ok")
        )
        return out

    def _feature_report(self, version: _Version, totals: Totals, i: int) -> dict[str, Any]:
        window, name = version.window, version.features[i]
        bins = window.features[i]
        counts = window.feature_counts(totals, i)
        n = int(counts.sum())
        value = psi(bins.expected, counts) if n else math.nan
        profile = (
            version.reference.reference.features[name]
            if version.reference and version.reference.reference
            else None
        )
        mean = float(totals.sums[i] / n) if n else None
        std = (
            math.sqrt(max(0.0, float(totals.squares[i] / n) - mean * mean))
            if mean is not None
            else None
        )
        ref_mean = getattr(profile, "mean", None)
        ref_std = getattr(profile, "std", None)
        shift = (
            (mean - ref_mean) / ref_std
            if mean is not None and ref_mean is not None and ref_std
            else None
        )
        return {
            "name": name,
            "kind": bins.kind,
            "psi": None if math.isnan(value) else value,
            "level": level(value),
            "mean": mean,
            "std": std,
            "reference_mean": ref_mean,
            "reference_std": ref_std,
            "shift_sigmas": shift,
            "bins": [
                {**where, "reference": float(e), "window": (c / n if n else None), "count": int(c)}
                for where, e, c in zip(bins.describe(), bins.expected, counts.tolist(), strict=True)
            ],
        }

    def _prediction_report(self, version: _Version, totals: Totals) -> dict[str, Any]:
        n = totals.predictions
        predicted = version.predicted
        value = psi(predicted.expected, totals.classes) if predicted is not None and n else math.nan
        report: dict[str, Any] = {
            "rows": n,
            "psi": None if math.isnan(value) else value,
            "level": level(value),
        }
        if version.labels is not None:
            expected = predicted.expected if predicted is not None else None
            report["classes"] = [
                {
                    "label": label,
                    "count": int(c),
                    "window": c / n if n else None,
                    "reference": float(expected[i]) if expected is not None else None,
                }
                for i, (label, c) in enumerate(
                    zip(version.labels, totals.classes.tolist(), strict=True)
                )
            ]
            reference_confidence = version.reference.mean_confidence if version.reference else None
            window_confidence = totals.confidence / n if n else None
            report["confidence"] = {
                "window": window_confidence,
                "reference": reference_confidence,
                "shift": (
                    window_confidence - reference_confidence
                    if window_confidence is not None and reference_confidence is not None
                    else None
                ),
            }
        elif predicted is not None:
            report["bins"] = [
                {**where, "reference": float(e), "window": (c / n if n else None), "count": int(c)}
                for where, e, c in zip(
                    predicted.describe(), predicted.expected, totals.classes.tolist(), strict=True
                )
            ]
        return report


def _remove(gauge: Any, *labels: str) -> None:
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)
