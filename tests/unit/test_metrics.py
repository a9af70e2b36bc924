"""Deferred metric observations (inferd.metrics.Deferred)."""

from __future__ import annotations

from prometheus_client import generate_latest

from inferd.metrics import Deferred, Metrics


def test_noted_observations_show_at_the_next_collection() -> None:
    metrics = Metrics()
    requests = metrics.requests.labels("/predict", "POST", "200")
    duration = metrics.request_duration.labels("/predict", "POST")
    for _ in range(3):
        metrics.deferred.add(requests.inc, 1)
        metrics.deferred.add(duration.observe, 0.004)

    assert requests._value.get() == 0  # noted, not applied yet
    text = generate_latest(metrics.registry).decode()
    assert 'inference_requests_total{endpoint="/predict",method="POST",status="200"} 3.0' in text
    assert (
        'inference_request_duration_seconds_bucket{endpoint="/predict",le="0.005",method="POST"} '
        "3.0" in text
    )
    assert (
        metrics.registry.get_sample_value(
            "inference_request_duration_seconds_count", {"endpoint": "/predict", "method": "POST"}
        )
        == 3.0
    )


def test_a_full_batch_is_applied_at_once_and_nothing_twice() -> None:
    seen: list[float] = []
    deferred = Deferred(batch=4)
    for i in range(3):
        deferred.add(seen.append, i)
    assert seen == []
    deferred.add(seen.append, 3)
    assert seen == [0, 1, 2, 3]
    deferred.fold()
    deferred.add(seen.append, 4)
    deferred.fold()
    assert seen == [0, 1, 2, 3, 4]
