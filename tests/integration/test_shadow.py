"""Shadow traffic through the whole app: copies after the answer, compared, shed first."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.models import write_scripted_model

URL = "/v1/models/sh/predict"


def with_shadow(models_dir: Path, shadow: str, **candidate: Any) -> None:
    write_scripted_model(models_dir, "sh", 1)
    write_scripted_model(models_dir, "sh", 2, **candidate)
    toml = models_dir / "sh" / "model.toml"
    toml.write_text(
        toml.read_text()
        + '[versions]\npolicy = "specific"\nversions = [1, 2]\ndefault = 1\n'
        + "[shadow]\n"
        + shadow
    )


def value(metrics: Any, result: str) -> float:
    labels = {"model": "sh", "version": "2", "result": result}
    return metrics.registry.get_sample_value("inference_shadow_requests_total", labels) or 0.0


async def test_every_answer_is_copied_to_the_shadow_and_compared(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    # max_busy = 1: the test's client shares the server's event loop and keeps it busy
    with_shadow(models_dir, "version = 2\nshare = 1.0\nmax_busy = 1.0\n", fail_on=7.0)
    async with serve() as s:
        answers = []
        for i in range(12):
            row = [7 if i % 4 == 0 else 10 + i, 1, 1, 1]  # 7: the shadow raises
            answers.append(await s.client.post(URL, json={"features": row}))
            await s.app.plane.shadow.drain()  # one copy per batch of the shadow
        metrics = s.app.metrics
        text = (await s.client.get("/metrics")).text
    assert [a.status_code for a in answers] == [200] * 12  # the shadow's errors are not sent
    assert {a.json()["model_version"] for a in answers} == {"1"}
    assert value(metrics, "agree") == 9
    assert value(metrics, "error") == 3
    assert value(metrics, "disagree") == 0
    assert 'inference_shadow_latency_seconds_count{model="sh",version="2"} 9.0' in text
    assert 'inference_shadow_score_difference_bucket{le="0.0",model="sh",version="2"} 9.0' in text


async def test_the_answer_does_not_wait_and_the_shadow_is_shed_first(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    with_shadow(models_dir, "version = 2\nmax_pending = 2\nmax_busy = 1.0\n", delay_s=0.2)
    async with serve(request_timeout_ms=10_000) as s:
        answers = await asyncio.gather(
            *(s.client.post(URL, json={"features": [i, 1, 1, 1]}) for i in range(10))
        )
        in_flight = s.app.plane.shadow.pending  # the answers are out; the copies are not
        await s.app.plane.shadow.drain()
        metrics = s.app.metrics
    assert [a.status_code for a in answers] == [200] * 10
    assert in_flight >= 1
    assert value(metrics, "dropped") >= 1  # more than two at once: dropped, not queued
    assert value(metrics, "agree") + value(metrics, "dropped") == 10


class Busy:
    """A loop load that says the event loop is as busy as told."""

    def __init__(self, busy: float) -> None:
        self.busy = busy

    def current(self) -> float:
        return self.busy


async def test_no_copies_while_the_event_loop_is_short_of_time(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    with_shadow(models_dir, "version = 2\nmax_busy = 0.5\n")
    async with serve() as s:
        s.app.plane.shadow.load = Busy(0.6)  # type: ignore[assignment]
        busy = [await s.client.post(URL, json={"features": [i, 1, 1, 1]}) for i in range(3)]
        await s.app.plane.shadow.drain()
        dropped = value(s.app.metrics, "dropped")
        s.app.plane.shadow.load = Busy(0.4)  # type: ignore[assignment]
        idle = [await s.client.post(URL, json={"features": [i, 1, 1, 1]}) for i in range(2)]
        await s.app.plane.shadow.drain()
        metrics = s.app.metrics
    assert [a.status_code for a in busy + idle] == [200] * 5
    assert dropped == 3
    assert value(metrics, "agree") == 2


def test_the_loop_load_is_its_threads_cpu_time_over_wall_time() -> None:
    import time

    from inferd.serving.shadow import LoopLoad

    load = LoopLoad()
    end = time.monotonic() + 0.15
    while time.monotonic() < end:  # busy on this thread
        pass
    assert load.current() > 0.5
    time.sleep(0.15)  # idle
    assert load.current() < 0.5
