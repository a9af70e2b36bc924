"""Merging several processes' metrics and console summaries (inferd.http.peers)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.parser import text_string_to_metric_families

from inferd.http.peers import (
    Family,
    collect,
    decode_families,
    encode_families,
    merge_families,
    merge_stats,
)


def families(requests: int, latencies: list[float], depth: int, ready: int) -> list[Family]:
    registry = CollectorRegistry()
    counter = Counter("inference_requests", "r", ("status",), registry=registry)
    counter.labels("200").inc(requests)
    histogram = Histogram("inference_request_latency_seconds", "l", buckets=(0.1, 1.0),
                          registry=registry)  # fmt: skip
    for seconds in latencies:
        histogram.observe(seconds)
    Gauge("inference_queue_depth", "q", registry=registry).set(depth)
    Gauge("inference_model_ready", "r", registry=registry).set(ready)
    return collect(registry)


def samples(text: bytes) -> dict[str, float]:
    found = {}
    for family in text_string_to_metric_families(text.decode()):
        for s in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            found[f"{s.name}{{{labels}}}"] = s.value
    return found


def test_counters_histograms_and_gauges_add_up_as_one_server() -> None:
    sibling = decode_families(encode_families(families(4, [0.05, 5.0], 1, 0)))  # as sent
    merged = samples(merge_families([families(3, [0.05, 0.5], 2, 1), sibling], expected=3))
    assert merged["inference_requests_total{status=200}"] == 7
    assert merged["inference_request_latency_seconds_bucket{le=0.1}"] == 2
    assert merged["inference_request_latency_seconds_bucket{le=1.0}"] == 3
    assert merged["inference_request_latency_seconds_bucket{le=+Inf}"] == 4
    assert merged["inference_request_latency_seconds_count{}"] == 4
    assert merged["inference_request_latency_seconds_sum{}"] == 5.6
    assert merged["inference_queue_depth{}"] == 3  # summed
    assert merged["inference_model_ready{}"] == 0  # ready only where every process is
    assert merged["inference_server_processes{}"] == 3
    assert merged["inference_server_processes_reporting{}"] == 2
    created = [k for k in merged if k.startswith("inference_requests_created")]
    assert len(created) == 1  # one series, not one per process


def test_console_summaries_sum_rates_and_bound_percentiles() -> None:
    one = {"window_seconds": 10.0, "time": 5.0, "jobs": {"queued": 4},
           "total": {"requests_per_second": 10.0, "p99_ms": 3.0, "mean_ms": 1.0, "requests": 100,
                     "rejections_total": {"shed": 1}}}  # fmt: skip
    two = {"window_seconds": 10.2, "time": 6.0, "jobs": {"queued": 4},
           "total": {"requests_per_second": 5.5, "p99_ms": 9.0, "mean_ms": 2.0, "requests": 55,
                     "rejections_total": {"shed": 2, "full": 1}}}  # fmt: skip
    merged = merge_stats([one, two])
    assert merged["window_seconds"] == 10.0 and merged["time"] == 5.0
    assert merged["jobs"] == {"queued": 4}  # the shared database, read by both
    total = merged["total"]
    assert total["requests_per_second"] == 15.5 and total["requests"] == 155
    assert total["p99_ms"] == 9.0 and total["mean_ms"] == 2.0
    assert total["rejections_total"] == {"shed": 3, "full": 1}
    assert one["total"]["requests"] == 100  # the inputs are left alone
