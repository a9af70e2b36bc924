"""Deferred metric observations (inferd.metrics.Deferred)."""

from __future__ import annotations

import math

from prometheus_client import CollectorRegistry, Histogram, generate_latest

from inferd.metrics import Deferred, Metrics, observe_many


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


def _exposition(registry: CollectorRegistry) -> list[str]:
    """The registry's text without its ``_created`` samples (times of creation)."""
    text = generate_latest(registry).decode()
    return [line for line in text.splitlines() if "_created" not in line]


def test_observe_many_gives_what_observe_gives_value_by_value() -> None:
    values = [0.0005, 0.001, 0.0010001, 0.0, -1.0, 0.05, 0.1, 0.5, 7.0, math.inf, math.nan]
    one, many = CollectorRegistry(), CollectorRegistry()
    buckets = (0.001, 0.01, 0.1, 1.0)
    by_one = Histogram("h", "h", ["model"], buckets=buckets, registry=one)
    by_many = Histogram("h", "h", ["model"], buckets=buckets, registry=many)
    for value in values * 3:
        by_one.labels("m").observe(value)
    observe_many(by_many.labels("m"), values * 3)
    assert _exposition(one) == _exposition(many)


def test_a_fold_groups_notes_and_applies_them_as_one_at_a_time_would() -> None:
    grouped, direct = Metrics(), Metrics()
    seen: list[float] = []
    for m, note in ((grouped, grouped.deferred.add), (direct, None)):
        requests = m.requests.labels("/predict", "POST", "200")
        duration = m.request_duration.labels("/predict", "POST")
        latency = m.request_latency.labels("iris", "1")
        for i in range(50):
            value = (i % 7) / 1000.0
            if note is None:
                requests.inc(1)
                duration.observe(value)
                latency.observe(value * 3)
            else:
                note(requests.inc, 1)
                note(duration.observe, value)
                note(latency.observe, value * 3)
                note(seen.append, value)  # any other function: applied value by value
    grouped.deferred.fold()
    assert seen == [(i % 7) / 1000.0 for i in range(50)]
    assert [s for s in _exposition(grouped.registry) if s.startswith("inference_")] == [
        s for s in _exposition(direct.registry) if s.startswith("inference_")
    ]


async def test_run_folds_the_slots_on_a_timer() -> None:
    import asyncio

    metrics = Metrics()
    counter = metrics.requests.labels("/predict", "POST", "200")
    note = metrics.deferred.slot(counter.inc)
    for _ in range(5):
        note(1)
    assert counter._value.get() == 0
    folding = asyncio.get_running_loop().create_task(metrics.deferred.run(0.01))
    try:
        for _ in range(100):
            if counter._value.get() == 5:
                break
            await asyncio.sleep(0.01)
    finally:
        folding.cancel()
    assert counter._value.get() == 5
