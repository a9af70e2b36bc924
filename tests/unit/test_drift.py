"""Drift monitoring: PSI, bins, the time window, the monitor's gauges and class counts."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from prometheus_client import CollectorRegistry

from inferd.metrics import Metrics
from inferd.models.loading import LoadedModel, ModelState, prepare
from inferd.models.repository import ModelRepository
from inferd.monitoring import Monitor, build_reference, load_reference
from inferd.monitoring.reference import Bins, CategoricalProfile, NumericProfile
from inferd.monitoring.window import EPSILON, Window, psi
from inferd.settings import Settings

FEATURES = ["sepal_length_cm", "sepal_width_cm", "petal_length_cm", "petal_width_cm"]
LABELS = ["setosa", "versicolor", "virginica"]
MEANS = np.array([5.8, 3.0, 3.8, 1.2])
STDS = np.array([0.8, 0.4, 1.8, 0.8])


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def sample(rng: np.random.Generator, n: int) -> np.ndarray:
    return rng.normal(MEANS, STDS, size=(n, len(FEATURES)))


def classify(rows: np.ndarray) -> np.ndarray:
    """A deterministic stand-in for a classifier: short petals setosa, long ones virginica."""
    z = (rows - MEANS) / STDS
    logits = np.stack([-3 * z[:, 2] + 0.1 * z[:, 0], 0.5 - 0.1 * z[:, 1], 3 * z[:, 2]], axis=1)
    e = np.exp(logits - logits.max(axis=1, keepdims=True))
    out: np.ndarray = e / e.sum(axis=1, keepdims=True)
    return out


@pytest.fixture
def settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(**overrides: Any) -> Settings:
        overrides.setdefault("data_dir", tmp_path / "data")
        return Settings(_env_file=None, **overrides)  # type: ignore[call-arg]

    return make


@pytest.fixture
def version(
    tmp_path: Path, demo_models: Path, settings: Callable[..., Settings]
) -> Callable[..., LoadedModel]:
    """An iris version (not loaded: the monitor only reads its metadata) whose reference is
    a 20,000-row sample of independent normal features and ``classify``'s outputs."""
    rng = np.random.default_rng(7)
    train = sample(rng, 20_000)
    reference = build_reference(train, FEATURES, outputs=classify(train), labels=LABELS)
    path = tmp_path / "reference.json"
    path.write_text(reference.dump())
    entry = ModelRepository(demo_models).read("iris")

    def make(metrics: Metrics, with_reference: bool = True) -> LoadedModel:
        loaded = prepare(entry, 1, settings(), metrics)
        loaded.labels = LABELS
        where = path if with_reference else tmp_path / "absent" / "reference.json"
        loaded.reference = load_reference(where, entry.spec, LABELS)
        loaded.state = ModelState.READY
        return loaded

    return make


def gauge(metrics: Metrics, name: str, **labels: str) -> float | None:
    value = metrics.registry.get_sample_value(name, labels)
    return value


# ----------------------------------------------------------------------------- PSI and bins
def test_psi_is_the_documented_sum() -> None:
    expected = np.array([0.5, 0.5])
    want = (0.9 - 0.5) * math.log(0.9 / 0.5) + (0.1 - 0.5) * math.log(0.1 / 0.5)
    assert psi(expected, np.array([90, 10])) == pytest.approx(want)
    assert psi(expected, np.array([50, 50])) == 0.0
    assert math.isnan(psi(expected, np.array([0, 0])))
    # an empty bin counts as EPSILON, not as log(0)
    floor = (EPSILON - 0.5) * math.log(EPSILON / 0.5) + (1 - 0.5) * math.log(1 / 0.5)
    assert psi(expected, np.array([0, 10])) == pytest.approx(floor)


def test_a_value_on_a_cut_point_falls_in_the_bin_below() -> None:
    bins = Bins.of(NumericProfile(edges=[1.0, 2.0], counts=[1, 1, 1]))
    assert bins.index(np.array([0.5, 1.0, 1.5, 2.0, 2.5])).tolist() == [0, 0, 1, 1, 2]
    assert bins.describe()[0] == {"lower": None, "upper": 1.0}


def test_unknown_categories_fall_in_other() -> None:
    bins = Bins.of(CategoricalProfile(kind="categorical", categories=[3, 1], counts=[30, 10]))
    assert bins.expected.tolist() == [0.25, 0.75, 0.0]  # sorted: 1, 3, then "other"
    assert bins.index(np.array([1.0, 3.0, 2.0, 7.0])).tolist() == [0, 1, 2, 2]


def test_the_reference_profile_bins_at_deciles() -> None:
    rng = np.random.default_rng(1)
    x = rng.normal(size=(10_000, 1))
    profile = build_reference(x, ["f"]).features["f"]
    assert isinstance(profile, NumericProfile)
    assert len(profile.edges) == 9 and profile.counts is not None
    assert all(abs(c - 1000) <= 1 for c in profile.counts)
    assert profile.mean == pytest.approx(0, abs=0.05) and profile.std == pytest.approx(1, abs=0.05)


# ----------------------------------------------------------------------------- the window
def test_the_window_forgets_buckets_that_slid_out() -> None:
    bins = Bins.of(NumericProfile(edges=[0.0], counts=[1, 1]))
    window = Window([bins], 0, seconds=60, buckets=6)
    window.add_inputs(np.array([[-1.0], [1.0]]), now=100.0)
    window.add_inputs(np.array([[1.0]]), now=135.0)
    totals = window.totals(now=140.0)
    assert totals.inputs == 3 and totals.bins.tolist() == [1, 2]
    assert totals.oldest == pytest.approx(40.0)
    totals = window.totals(now=165.0)  # the bucket of t=100 (100-110) left the window
    assert totals.inputs == 1 and totals.bins.tolist() == [0, 1]
    window.add_inputs(np.array([[-1.0]]), now=205.0)  # reuses the slot of t=145
    assert window.totals(now=205.0).bins.tolist() == [1, 0]  # t=135 is gone too


# ----------------------------------------------------------------------------- the monitor
def test_reference_data_is_stable_and_a_shifted_feature_drifts_alone(
    version: Callable[..., LoadedModel], settings: Callable[..., Settings]
) -> None:
    metrics = Metrics(CollectorRegistry())
    stable, shifted = version(metrics), version(metrics)
    shifted.version_str = "2"
    monitor = Monitor(settings(drift_min_rows=200), metrics, clock=Clock())
    rng = np.random.default_rng(11)
    fresh = sample(rng, 5000)
    moved = sample(rng, 5000)
    moved[:, 2] += 2 * STDS[2]  # petal_length_cm, +2 sigma
    for start in range(0, 5000, 25):  # batches, as the batcher hands them over
        monitor.observe(stable, fresh[start : start + 25], classify(fresh[start : start + 25]))
        monitor.observe(shifted, moved[start : start + 25], classify(moved[start : start + 25]))
    monitor.update()

    for feature in FEATURES:
        assert gauge(metrics, "inference_feature_drift", model="iris", version="1",
                     feature=feature) < 0.1  # fmt: skip
    drifted = {
        f: gauge(metrics, "inference_feature_drift", model="iris", version="2", feature=f)
        for f in FEATURES
    }
    assert drifted["petal_length_cm"] > 0.25
    assert all(v < 0.1 for f, v in drifted.items() if f != "petal_length_cm"), drifted
    assert gauge(metrics, "inference_input_drift", model="iris", version="2") == pytest.approx(
        drifted["petal_length_cm"]
    )
    assert gauge(metrics, "inference_input_drift", model="iris", version="1") < 0.1
    assert gauge(metrics, "inference_drift_window_rows", model="iris", version="1") == 5000
    # the predictions move with the inputs
    assert gauge(metrics, "inference_prediction_drift", model="iris", version="1") < 0.1
    assert gauge(metrics, "inference_prediction_drift", model="iris", version="2") > 0.25

    report = monitor.report(shifted)
    assert report["status"] == "drift"
    assert report["input_drift"]["feature"] == "petal_length_cm"
    petal = next(f for f in report["features"] if f["name"] == "petal_length_cm")
    assert petal["level"] == "significant"
    assert petal["shift_sigmas"] == pytest.approx(2.0, abs=0.1)
    assert sum(b["count"] for b in petal["bins"]) == 5000
    assert monitor.report(stable)["status"] == "ok"


def test_class_counts_are_exact_and_confidence_is_the_mean(
    version: Callable[..., LoadedModel], settings: Callable[..., Settings]
) -> None:
    metrics = Metrics(CollectorRegistry())
    loaded = version(metrics)
    # 1,000 values per update: 250 of the 4,000 rows are binned, every prediction is counted
    monitor = Monitor(settings(drift_max_values_per_update=1000), metrics, Clock(), seed=3)
    rows = sample(np.random.default_rng(5), 4000)
    out = classify(rows)
    for start in range(0, 4000, 100):
        monitor.observe(loaded, rows[start : start + 100], out[start : start + 100])
    monitor.update()
    counts = np.bincount(out.argmax(axis=1), minlength=3)
    for label, count in zip(LABELS, counts, strict=True):
        assert gauge(metrics, "inference_predicted_class_total", model="iris", version="1",
                     **{"class": label}) == count  # fmt: skip
    assert gauge(metrics, "inference_prediction_confidence", model="iris", version="1") == (
        pytest.approx(out.max(axis=1).mean())
    )
    assert monitor.sampled_rows == 4000 - 250
    assert gauge(metrics, "inference_drift_window_rows", model="iris", version="1") == 250
    report = monitor.report(loaded)
    assert report["window"]["rows"] == 250 and report["window"]["predictions"] == 4000
    assert report["predictions"]["confidence"]["reference"] == pytest.approx(
        loaded.reference.mean_confidence if loaded.reference else None
    )


def test_few_rows_export_no_drift_and_a_gone_version_exports_nothing(
    version: Callable[..., LoadedModel], settings: Callable[..., Settings]
) -> None:
    metrics = Metrics(CollectorRegistry())
    loaded = version(metrics)
    clock = Clock()
    monitor = Monitor(settings(drift_min_rows=200, drift_window_seconds=60), metrics, clock)
    rows = sample(np.random.default_rng(2), 300)
    monitor.observe(loaded, rows[:100], classify(rows[:100]))
    monitor.update()
    labels = {"model": "iris", "version": "1"}
    assert gauge(metrics, "inference_input_drift", **labels) is None
    assert gauge(metrics, "inference_drift_window_rows", **labels) == 100
    assert monitor.report(loaded)["status"] == "insufficient_data"
    monitor.observe(loaded, rows[100:], classify(rows[100:]))
    monitor.update()
    assert gauge(metrics, "inference_input_drift", **labels) is not None
    clock.now += 120  # the whole window slides past: back under the minimum
    monitor.update()
    assert gauge(metrics, "inference_input_drift", **labels) is None
    assert gauge(metrics, "inference_feature_drift", feature="sepal_length_cm", **labels) is None
    assert gauge(metrics, "inference_drift_window_rows", **labels) == 0
    loaded.state = ModelState.UNLOADED
    monitor.update()
    assert gauge(metrics, "inference_drift_window_rows", **labels) is None
    assert gauge(metrics, "inference_reference_confidence", **labels) is None


def test_without_a_reference_only_predictions_are_watched(
    version: Callable[..., LoadedModel], settings: Callable[..., Settings]
) -> None:
    metrics = Metrics(CollectorRegistry())
    loaded = version(metrics, with_reference=False)
    monitor = Monitor(settings(), metrics, Clock())
    rows = sample(np.random.default_rng(4), 500)
    monitor.observe(loaded, rows, classify(rows))
    monitor.update()
    labels = {"model": "iris", "version": "1"}
    assert gauge(metrics, "inference_drift_window_rows", **labels) is None
    assert gauge(metrics, "inference_prediction_confidence", **labels) is not None
    report = monitor.report(loaded)
    assert report["status"] == "no_reference"
    assert "no reference.json" in report["detail"] and "inferd models profile" in report["detail"]
    assert report["predictions"]["rows"] == 500


def test_observe_never_raises_and_a_bad_batch_stops_only_its_version(
    version: Callable[..., LoadedModel], settings: Callable[..., Settings]
) -> None:
    metrics = Metrics(CollectorRegistry())
    good, bad = version(metrics), version(metrics)
    bad.version_str = "9"
    monitor = Monitor(settings(drift_min_rows=10), metrics, Clock())
    monitor.observe(good, None, None)  # len(None) fails inside: swallowed
    rows = sample(np.random.default_rng(6), 50)
    monitor.observe(bad, rows, np.ones((50, 7)))  # 7 columns for 3 labels
    monitor.observe(good, rows, classify(rows))
    monitor.update()
    assert "expected (rows, 3)" in monitor.report(bad)["error"]
    assert gauge(metrics, "inference_drift_window_rows", model="iris", version="1") == 50
