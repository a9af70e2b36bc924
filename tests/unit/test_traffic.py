"""Splits between versions and the rollback rule, without a server."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from inferd.metrics import Metrics
from inferd.models.registry import ModelRegistry
from inferd.models.spec import RollbackSpec, SplitSpec
from inferd.serving.traffic import Split, Traffic
from inferd.settings import Settings


def test_weights_land_within_a_point_over_ten_thousand_draws() -> None:
    split = Split({1: 95, 2: 5})
    draw = random.Random(7).random
    counts = Counter(split.pick(draw()) for _ in range(10_000))
    assert abs(counts[1] / 10_000 - 0.95) <= 0.01
    assert abs(counts[2] / 10_000 - 0.05) <= 0.01
    assert Split({1: 1, 2: 0, 3: 1}).pick(0.7) == 3  # weight 0 takes nothing
    assert Split({1: 0.0, 2: 3.0}).primary == 2
    assert Split({1: 5.0, 2: 5.0}).primary == 1  # a tie: the lower version


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def traffic(tmp_path: object) -> tuple[Traffic, Metrics, Clock]:
    metrics = Metrics()
    settings = Settings(_env_file=None, models_dir=str(tmp_path))  # type: ignore[call-arg]
    clock = Clock()
    return Traffic(ModelRegistry(settings, metrics), metrics, clock), metrics, clock


def test_a_failing_canary_is_taken_out_with_its_reason(tmp_path: object) -> None:
    t, metrics, clock = traffic(tmp_path)
    rule = RollbackSpec(window_seconds=10, min_requests=20, error_rate_margin=0.05)
    t.overrides["m"] = Split({1: 90, 2: 10}, rollback=rule, source="admin")
    for i in range(40):
        clock.now += 0.1
        t.observe("m", 1, 0.002, False)
        t.observe("m", 2, 0.002, i % 5 == 0)  # 20 % errors
    split = t.split_of("m")
    assert split is not None
    assert split.weights == {1: 90, 2: 0.0}
    assert "error rate 20.0% vs 0.0%" in split.rolled_back[2]
    labels = {"model": "m", "version": "2", "reason": "error_rate"}
    assert metrics.registry.get_sample_value("inference_split_rollbacks_total", labels) == 1


def test_latency_and_the_window(tmp_path: object) -> None:
    t, _, clock = traffic(tmp_path)
    rule = RollbackSpec(window_seconds=5, min_requests=10, latency_margin=0.5)
    t.overrides["m"] = Split({1: 50, 2: 50}, rollback=rule, source="admin")
    for _ in range(30):  # as fast as the primary: stays
        clock.now += 0.1
        t.observe("m", 1, 0.010, False)
        t.observe("m", 2, 0.012, False)
    assert t.check("m") == []
    clock.now += 6  # the window has moved on: nothing to compare yet
    for _ in range(5):
        t.observe("m", 2, 0.5, False)
    assert t.check("m") == []
    for _ in range(10):
        clock.now += 0.1
        t.observe("m", 1, 0.010, False)
        t.observe("m", 2, 0.030, False)
    split = t.split_of("m")
    assert split is not None and split.weights[2] == 0.0
    assert split.rolled_back[2].startswith("p99 ")


def test_split_tables_are_checked() -> None:
    with pytest.raises(ValueError, match="at least one weight must be positive"):
        SplitSpec(weights={1: 0})
    with pytest.raises(ValueError, match="sticky_by"):
        SplitSpec(weights={1: 1}, sticky_by="cookie:x")
    with pytest.raises(ValueError, match="not a version number"):
        SplitSpec.model_validate({"weights": {"01": 1}})
    with pytest.raises(ValueError, match="is not a number"):
        SplitSpec.model_validate({"weights": {"1": "5"}})
    spec = SplitSpec.model_validate({"weights": {"1": 95, "2": 5}, "sticky_by": "header:X-User"})
    assert spec.weights == {1: 95.0, 2: 5.0}


def test_shadow_answers_are_compared_by_label_or_by_score() -> None:
    import numpy as np

    from inferd.serving.shadow import compare

    sent = np.array([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1]])
    close = np.array([[0.7, 0.2, 0.1], [0.3, 0.6, 0.1]])
    other = np.array([[0.2, 0.7, 0.1], [0.3, 0.6, 0.1]])
    assert compare("classification", 0.0, sent, close) == (True, pytest.approx(0.1))
    assert compare("classification", 0.0, sent, other)[0] is False
    assert compare("regression", 0.01, np.array([1.0, 2.0]), np.array([1.005, 2.0]))[0]
    assert not compare("regression", 0.001, np.array([1.0, 2.0]), np.array([1.005, 2.0]))[0]
    assert compare("regression", 0.1, np.array([1.0]), np.array([1.0, 2.0])) == (False, None)
