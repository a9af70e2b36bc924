"""``GET /v1/stats`` figures: rates and percentiles over a window, from a real Metrics registry."""

from __future__ import annotations

import asyncio
import math

import pytest

from inferd.console.stats import MAX_WINDOW, Stats, quantile
from inferd.errors import BadRequest
from inferd.metrics import Metrics


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_quantile_interpolates_inside_the_bucket_like_histogram_quantile() -> None:
    buckets = {0.001: 0.0, 0.002: 10.0, 0.005: 20.0, math.inf: 20.0}
    assert quantile(0.5, buckets) == pytest.approx(0.002)
    assert quantile(0.25, buckets) == pytest.approx(0.0015)
    assert quantile(0.75, buckets) == pytest.approx(0.0035)
    assert quantile(0.99, {0.01: 1.0, math.inf: 100.0}) == pytest.approx(0.01)  # above: +Inf
    assert quantile(0.5, {0.01: 0.0, math.inf: 0.0}) is None
    assert quantile(0.5, {}) is None


def test_rates_and_percentiles_cover_the_window_only() -> None:
    metrics, clock = Metrics(), Clock()
    stats = Stats(metrics, clock=clock)
    latency = metrics.request_latency.labels("iris", "1")
    for _ in range(10):
        latency.observe(0.004)  # before the window
    clock.now += 5
    first = stats.summary(window=10)
    assert first["models"]["iris"]["requests"] == 10  # everything since start
    assert first["models"]["iris"]["requests_per_second"] == pytest.approx(2.0)

    clock.now += 15
    for _ in range(30):
        latency.observe(0.0015)
    for _ in range(3):
        metrics.request_latency.labels("iris", "2").observe(0.2)  # versions add up
    summary = stats.summary(window=10)
    iris = summary["models"]["iris"]
    assert summary["window_seconds"] == pytest.approx(15.0)  # back to the reading at +5 s
    assert iris["requests"] == 33
    assert iris["requests_total"] == 43
    assert iris["requests_per_second"] == pytest.approx(33 / 15, abs=1e-3)
    assert 1.0 < iris["p50_ms"] < 2.0
    assert 150.0 < iris["p99_ms"] <= 250.0
    assert summary["total"]["requests"] == 33


def test_sampled_readings_keep_the_window_exact_after_a_quiet_spell() -> None:
    metrics, clock = Metrics(), Clock()
    stats = Stats(metrics, clock=clock)
    for _ in range(3600):  # an hour nobody looked, the sampler ticking every second
        clock.now += 1
        stats.sample()
    for _ in range(10):
        metrics.request_latency.labels("iris", "1").observe(0.001)
    clock.now += 0.4
    summary = stats.summary(window=10)
    assert summary["window_seconds"] == pytest.approx(10.4)  # not the hour
    assert summary["total"]["requests_per_second"] == pytest.approx(10 / 10.4, abs=1e-3)
    assert len(stats._readings) <= MAX_WINDOW + 2


async def test_the_sampler_takes_readings_until_cancelled() -> None:
    class Ticking(Clock):
        def __call__(self) -> float:
            self.now += 1.0
            return self.now

    stats = Stats(Metrics(), clock=Ticking())
    task = asyncio.get_running_loop().create_task(stats.run(every=0.001))
    await asyncio.sleep(0.05)
    assert len(stats._readings) > 3
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task


def test_batches_queue_rejections_and_jobs() -> None:
    metrics, clock = Metrics(), Clock()
    stats = Stats(metrics, clock=clock)
    for rows in (4, 8, 12):
        metrics.batch_size.labels("iris", "1").observe(rows)
    metrics.queue_depth.labels("iris", "1").set(7)
    metrics.queue_depth.labels("other", "1").set(2)
    metrics.queue_rejections.labels("iris", "1", "shed").inc(5)
    metrics.queue_rejections.labels("iris", "1", "full").inc(1)
    metrics.request_timeouts.labels("iris", "1").inc(2)
    metrics.jobs.labels("queued").set(3)
    metrics.limit_rejections.labels("unauthorized").inc()
    clock.now += 2
    summary = stats.summary(window=1)
    iris = summary["models"]["iris"]
    assert iris["mean_batch_size"] == pytest.approx(8.0)
    assert iris["batches_per_second"] == pytest.approx(1.5)
    assert iris["queue_depth"] == 7
    assert iris["rejections_per_second"] == pytest.approx(3.0)
    assert iris["rejections_total"] == {"full": 1, "shed": 5}
    assert iris["timeouts_total"] == 2
    assert summary["total"]["queue_depth"] == 9
    assert summary["jobs"]["queued"] == 3
    assert summary["limit_rejections_total"] == {"unauthorized": 1}


def test_readings_stay_bounded_and_bad_windows_are_refused() -> None:
    stats = Stats(Metrics(), clock=(clock := Clock()))
    for _ in range(2000):
        clock.now += 0.1
        stats.summary()
    # One reading per half second, over at most the longest window (and one before it).
    assert len(stats._readings) <= MAX_WINDOW / 0.5 + 2
    for window in (0, 0.5, MAX_WINDOW + 1, math.nan):
        with pytest.raises(BadRequest, match="window must be between"):
            stats.summary(window=window)
