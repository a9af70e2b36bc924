"""A live summary of this process's own metrics, for the console's live view (``GET /v1/stats``).

Prometheus counters and histograms only ever grow, so a rate or a recent percentile needs two
readings. :class:`Stats` keeps readings of the serving-path families, taken by :meth:`Stats.run`
every second (and by each call; at most one per :data:`MIN_INTERVAL`, none older than needed
for :data:`MAX_WINDOW`), and answers each call with the difference between now and the reading
``window`` seconds ago: requests per second, p50/p95/p99 latency interpolated from the
histogram buckets as ``histogram_quantile`` does, mean batch size, rejections; plus the gauges
(queue depth, jobs) as they are now. A reading is a walk over a few families' samples, done on
the event loop (microseconds); the first is taken when the app is built.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from prometheus_client.metrics import MetricWrapperBase

from inferd.errors import BadRequest
from inferd.logs import get_logger
from inferd.metrics import Metrics

__all__ = [
    "DEFAULT_WINDOW",
    "MAX_WINDOW",
    "MIN_INTERVAL",
    "QUANTILES",
    "SAMPLE_EVERY",
    "Stats",
    "quantile",
]

log = get_logger("inferd.console")

DEFAULT_WINDOW = 10.0
MAX_WINDOW = 60.0
MIN_INTERVAL = 0.5
SAMPLE_EVERY = 1.0
QUANTILES = {"p50_ms": 0.5, "p95_ms": 0.95, "p99_ms": 0.99}


@dataclass
class _Histogram:
    """One histogram's cumulative bucket counts (upper bound → count), sum and count."""

    buckets: dict[float, float] = field(default_factory=dict)
    sum: float = 0.0
    count: float = 0.0

    def add(self, other: _Histogram) -> None:
        for bound, value in other.buckets.items():
            self.buckets[bound] = self.buckets.get(bound, 0.0) + value
        self.sum += other.sum
        self.count += other.count

    def since(self, before: _Histogram | None) -> _Histogram:
        """What was observed after ``before`` (clamped at zero)."""
        if before is None:
            return _Histogram(dict(self.buckets), self.sum, self.count)
        return _Histogram(
            {b: max(0.0, v - before.buckets.get(b, 0.0)) for b, v in self.buckets.items()},
            max(0.0, self.sum - before.sum),
            max(0.0, self.count - before.count),
        )


@dataclass
class _Reading:
    """The serving-path counters and histograms at one moment, summed over model versions."""

    at: float
    latency: dict[str, _Histogram]
    batches: dict[str, _Histogram]
    rejections: dict[tuple[str, str], float]  # (model, reason) → count
    timeouts: dict[str, float]


def quantile(q: float, buckets: dict[float, float]) -> float | None:
    """The ``q`` quantile of cumulative ``buckets``, interpolated linearly inside the bucket
    that holds it (Prometheus ``histogram_quantile``); None when nothing was observed. A rank in
    the ``+Inf`` bucket answers the highest finite bound: the histogram knows nothing above."""
    bounds = sorted(buckets)
    if not bounds or not 0.0 <= q <= 1.0:
        return None
    total = buckets[bounds[-1]]
    if total <= 0:
        return None
    rank = q * total
    lower, below = 0.0, 0.0
    for bound in bounds:
        count = buckets[bound]
        if count >= rank and count > below:
            if math.isinf(bound):
                return lower
            return lower + (bound - lower) * (rank - below) / (count - below)
        lower, below = (bound if not math.isinf(bound) else lower), count
    return lower


class Stats:
    """Rates and recent percentiles from one process's :class:`~inferd.metrics.Metrics`."""

    def __init__(self, metrics: Metrics, clock: Any = time.monotonic) -> None:
        self.metrics = metrics
        self._clock = clock
        self._started = clock()
        self._readings: deque[_Reading] = deque()
        self._readings.append(self._read())

    def summary(self, window: float = DEFAULT_WINDOW) -> dict[str, Any]:
        """The body of ``GET /v1/stats``: the last ``window`` seconds (1 to 60)."""
        if not (isinstance(window, int | float) and 1.0 <= window <= MAX_WINDOW):
            raise BadRequest(f"window must be between 1 and {MAX_WINDOW:g} seconds, got {window}")
        now = self._read()
        base = self._baseline(now.at - window)
        self._keep(now)
        span = now.at - base.at
        depth = self._queue_depth()
        names = sorted(set(now.latency) | set(now.batches) | set(depth))
        models = {name: self._model(name, now, base, span, depth.get(name, 0.0)) for name in names}
        for name, figures in self._traffic().items():
            if name in models:
                models[name]["traffic"] = figures
        total = self._model("", now, base, span, sum(depth.values()), names)
        return {
            "window_seconds": round(span, 3),
            "uptime_seconds": round(now.at - self._started, 3),
            "time": time.time(),
            "total": total,
            "models": models,
            "jobs": self._gauge_by(self.metrics.jobs, "status"),
            "limit_rejections_total": self._counter_by(self.metrics.limit_rejections, "reason"),
        }

    def sample(self) -> None:
        """Take a reading now (the sampler's tick)."""
        self._keep(self._read())

    async def run(self, every: float = SAMPLE_EVERY) -> None:
        """Take a reading every ``every`` seconds until cancelled, so that a window is exact
        from the first call after a quiet spell too."""
        while True:
            try:
                self.sample()
            except Exception as exc:  # a broken collector must not end the sampler
                log.warning("could not read the metrics for /v1/stats", detail=repr(exc))
            await asyncio.sleep(every)

    # ------------------------------------------------------------------ readings
    def _read(self) -> _Reading:
        m = self.metrics
        return _Reading(
            at=self._clock(),
            latency=_histograms(m.request_latency),
            batches=_histograms(m.batch_size),
            rejections={
                (labels["model"], labels["reason"]): value
                for labels, value in _counters(m.queue_rejections)
            },
            timeouts=_sum_by_model(_counters(m.request_timeouts)),
        )

    def _baseline(self, since: float) -> _Reading:
        """The newest stored reading taken at or before ``since``, else the oldest one."""
        best = self._readings[0]
        for reading in self._readings:
            if reading.at > since:
                break
            best = reading
        return best

    def _keep(self, now: _Reading) -> None:
        """Store ``now`` if the last reading is old enough, and forget readings that no window
        needs: everything before the newest one at least :data:`MAX_WINDOW` old."""
        readings = self._readings
        if now.at - readings[-1].at >= MIN_INTERVAL:
            readings.append(now)
        horizon = now.at - MAX_WINDOW
        while len(readings) > 1 and readings[1].at <= horizon:
            readings.popleft()

    # ------------------------------------------------------------------ summaries
    def _model(
        self,
        name: str,
        now: _Reading,
        base: _Reading,
        span: float,
        depth: float,
        names: Iterable[str] = (),
    ) -> dict[str, Any]:
        """One model's figures; with ``name == ""``, all of ``names`` together."""
        wanted = list(names) if name == "" else [name]
        latency, batches = _Histogram(), _Histogram()
        latency_total = 0.0
        for model in wanted:
            if model in now.latency:
                latency.add(now.latency[model].since(base.latency.get(model)))
                latency_total += now.latency[model].count
            if model in now.batches:
                batches.add(now.batches[model].since(base.batches.get(model)))
        rejected_now = {k: v for k, v in now.rejections.items() if k[0] in wanted}
        rejected = sum(max(0.0, v - base.rejections.get(k, 0.0)) for k, v in rejected_now.items())
        by_reason: dict[str, float] = {}
        for (_, reason), value in rejected_now.items():
            by_reason[reason] = by_reason.get(reason, 0.0) + value
        timeouts = sum(now.timeouts.get(model, 0.0) for model in wanted)

        def per_second(n: float) -> float:
            return round(n / span, 3) if span > 0 else 0.0

        doc: dict[str, Any] = {
            "requests": int(latency.count),
            "requests_per_second": per_second(latency.count),
            "requests_total": int(latency_total),
        }
        for key, q in QUANTILES.items():
            seconds = quantile(q, latency.buckets)
            doc[key] = round(seconds * 1000.0, 3) if seconds is not None else None
        doc["mean_ms"] = round(latency.sum / latency.count * 1000.0, 3) if latency.count else None
        doc["batches_per_second"] = per_second(batches.count)
        doc["mean_batch_size"] = round(batches.sum / batches.count, 2) if batches.count else None
        doc["queue_depth"] = int(depth)
        doc["rejections_per_second"] = per_second(rejected)
        doc["rejections_total"] = {reason: int(v) for reason, v in sorted(by_reason.items())}
        doc["timeouts_total"] = int(timeouts)
        return doc

    def _traffic(self) -> dict[str, dict[str, Any]]:
        """Per model, since the process started: the split's shares, the result cache's hits,
        and each shadow version's agreement (only what a model has)."""
        m = self.metrics
        out: dict[str, dict[str, Any]] = {}
        for labels, value in _gauges(m.split_weight):
            if value > 0:
                split = out.setdefault(labels["model"], {}).setdefault("split", {})
                split[labels["version"]] = round(value, 6)
        for labels, value in _counters(m.cache_requests):
            cache = out.setdefault(labels["model"], {}).setdefault("cache", {"hit": 0, "miss": 0})
            cache[labels["result"]] = int(value)
        for labels, value in _counters(m.shadow_requests):
            shadows = out.setdefault(labels["model"], {}).setdefault("shadow", {})
            counts = shadows.setdefault(labels["version"], {})
            counts[labels["result"]] = int(value)
        for figures in out.values():
            cache = figures.get("cache")
            if cache is not None:
                looked = cache["hit"] + cache["miss"]
                cache["hit_ratio"] = round(cache["hit"] / looked, 4) if looked else None
            for counts in figures.get("shadow", {}).values():
                compared = counts.get("agree", 0) + counts.get("disagree", 0)
                counts["agreement"] = (
                    round(counts.get("agree", 0) / compared, 4) if compared else None
                )
        return out

    def _queue_depth(self) -> dict[str, float]:
        return _sum_by_model(_gauges(self.metrics.queue_depth))

    @staticmethod
    def _gauge_by(metric: MetricWrapperBase, label: str) -> dict[str, int]:
        return {labels[label]: int(value) for labels, value in _gauges(metric)}

    @staticmethod
    def _counter_by(metric: MetricWrapperBase, label: str) -> dict[str, int]:
        return {labels[label]: int(value) for labels, value in _counters(metric)}


def _samples(metric: MetricWrapperBase, suffix: str) -> Iterable[tuple[dict[str, str], float]]:
    for family in metric.collect():
        for sample in family.samples:
            if sample.name.endswith(suffix):
                yield sample.labels, sample.value


def _counters(metric: MetricWrapperBase) -> Iterable[tuple[dict[str, str], float]]:
    return _samples(metric, "_total")


def _gauges(metric: MetricWrapperBase) -> Iterable[tuple[dict[str, str], float]]:
    for family in metric.collect():
        for sample in family.samples:
            yield sample.labels, sample.value


def _sum_by_model(samples: Iterable[tuple[dict[str, str], float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for labels, value in samples:
        out[labels["model"]] = out.get(labels["model"], 0.0) + value
    return out


def _histograms(metric: MetricWrapperBase) -> dict[str, _Histogram]:
    """A model-and-version histogram, summed over versions: model → histogram."""
    out: dict[str, _Histogram] = {}
    for family in metric.collect():
        for sample in family.samples:
            labels = sample.labels
            hist = out.setdefault(labels["model"], _Histogram())
            if sample.name.endswith("_bucket"):
                bound = float(labels["le"])
                hist.buckets[bound] = hist.buckets.get(bound, 0.0) + sample.value
            elif sample.name.endswith("_count"):
                hist.count += sample.value
            elif sample.name.endswith("_sum"):
                hist.sum += sample.value
    return out
