"""Splits between served versions through the whole app: weights, pins, stickiness, changes
under load, and the automatic rollback of a failing canary."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.models import write_scripted_model

URL = "/v1/models/ab/predict"
ROW = {"features": [1, 2, 3, 4]}


def two_versions(models_dir: Path, split: str = "", canary_fails_on: float | None = None) -> None:
    write_scripted_model(models_dir, "ab", 1)
    behaviour = {} if canary_fails_on is None else {"fail_on": canary_fails_on}
    write_scripted_model(models_dir, "ab", 2, **behaviour)
    toml = models_dir / "ab" / "model.toml"
    toml.write_text(
        toml.read_text()
        + '[versions]\npolicy = "specific"\nversions = [1, 2]\ndefault = 1\n'
        + split
    )


async def test_a_model_toml_split_shares_requests_and_a_header_pins_one(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    two_versions(models_dir, '[split]\nweights = { "1" = 50, "2" = 50 }\n')
    async with serve() as s:
        answers = [await s.client.post(URL, json=ROW) for _ in range(80)]
        pinned = [
            await s.client.post(URL, json=ROW, headers={"X-Inferd-Variant": "2"}) for _ in range(5)
        ]
        by_path = await s.client.post("/v1/models/ab/versions/1/predict", json=ROW)
        unknown = await s.client.post(URL, json=ROW, headers={"X-Inferd-Variant": "7"})
        garbled = await s.client.post(URL, json=ROW, headers={"X-Inferd-Variant": "two"})
        shown = (await s.client.get("/v1/admin/models/ab/split")).json()
        metrics = (await s.client.get("/metrics")).text
    versions = Counter(a.json()["model_version"] for a in answers)
    assert all(a.status_code == 200 for a in answers)
    assert versions["1"] > 15 and versions["2"] > 15  # 50/50 over 80: both, surely
    assert [p.json()["model_version"] for p in pinned] == ["2"] * 5
    assert by_path.json()["model_version"] == "1"  # a version in the path is not split
    assert unknown.status_code == 404
    assert garbled.status_code == 400
    assert "X-Inferd-Variant" in garbled.json()["error"]["message"]
    assert shown["split"]["source"] == "model.toml"
    assert shown["split"]["shares"] == {"1": 0.5, "2": 0.5}
    assert 'inference_split_share{model="ab",version="2"} 0.5' in metrics
    # The version that answered is in the per-version metrics, as without a split.
    assert 'inference_request_latency_seconds_count{model="ab",version="2"}' in metrics


async def test_95_5_lands_within_a_point_over_10000_routings(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    from inferd.serving import RequestContext

    two_versions(models_dir)
    async with serve() as s:
        put = await s.client.put(
            "/v1/admin/models/ab/split",
            json={"weights": {"1": 95, "2": 5}, "sticky_by": "header:X-User"},
        )
        assert put.status_code == 200
        traffic, default = s.app.plane.traffic, s.app.registry.get("ab")
        drawn: Counter[int] = Counter()
        sticky: Counter[int] = Counter()
        for i in range(10_000):
            ctx = RequestContext(str(i), 0.0, 0.0)
            ctx.headers = [(b"content-type", b"application/json")]
            drawn[traffic.route(default, ctx)[0].version] += 1
            ctx.headers = [(b"x-user", b"user-%d" % i)]  # 10,000 users, each sticky
            sticky[traffic.route(default, ctx)[0].version] += 1
        answers: Counter[str] = Counter()
        for _ in range(100):
            answers[(await s.client.post(URL, json=ROW)).json()["model_version"]] += 1
    for counts in (drawn, sticky):
        assert abs(counts[1] / 10_000 - 0.95) <= 0.01, counts
        assert abs(counts[2] / 10_000 - 0.05) <= 0.01, counts
    assert sum(answers.values()) == 100 and answers["1"] >= 80  # and so through HTTP


async def test_a_sticky_header_keeps_each_user_on_one_version(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    two_versions(models_dir)
    async with serve() as s:
        put = await s.client.put(
            "/v1/admin/models/ab/split",
            json={"weights": {"1": 50, "2": 50}, "sticky_by": "header:X-User"},
        )
        seen: dict[str, set[str]] = {}
        for user in range(24):
            for _ in range(4):
                answer = await s.client.post(URL, json=ROW, headers={"X-User": f"user-{user}"})
                seen.setdefault(f"user-{user}", set()).add(answer.json()["model_version"])
        refused = await s.client.put(
            "/v1/admin/models/ab/split", json={"weights": {"1": 50, "3": 50}}
        )
        bad = await s.client.put("/v1/admin/models/ab/split", json={"weights": {"1": 0}})
        cleared = (await s.client.delete("/v1/admin/models/ab/split")).json()
        after = {(await s.client.post(URL, json=ROW)).json()["model_version"] for _ in range(10)}
    assert put.status_code == 200, put.text
    assert put.json()["split"]["sticky_by"] == "header:X-User"
    assert all(len(versions) == 1 for versions in seen.values())  # sticky
    assert {v for versions in seen.values() for v in versions} == {"1", "2"}
    assert refused.status_code == 404
    assert "does not serve version 3" in refused.json()["error"]["message"]
    assert bad.status_code == 422
    assert cleared["split"] is None
    assert after == {"1"}  # the default version again


async def test_no_request_fails_while_the_split_changes_under_load(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    two_versions(models_dir)
    stop = asyncio.Event()
    statuses: Counter[int] = Counter()
    versions: Counter[str] = Counter()

    # A deadline far off: this box's load must not be mistaken for a routing failure.
    async with serve(request_timeout_ms=10_000) as s:

        async def client() -> None:
            while not stop.is_set():
                answer = await s.client.post(URL, json=ROW)
                statuses[answer.status_code] += 1
                if answer.status_code == 200:
                    versions[answer.json()["model_version"]] += 1

        clients = [asyncio.create_task(client()) for _ in range(50)]
        changes = [{"1": 100, "2": 0}, {"1": 0, "2": 100}, {"1": 50, "2": 50}, None] * 3
        for weights in changes:
            await asyncio.sleep(0.1)
            if weights is None:
                done = await s.client.delete("/v1/admin/models/ab/split")
            else:
                done = await s.client.put("/v1/admin/models/ab/split", json={"weights": weights})
            assert done.status_code == 200, done.text
        stop.set()
        await asyncio.gather(*clients)
    assert set(statuses) == {200}, statuses
    assert statuses[200] >= 100
    assert versions["1"] > 0 and versions["2"] > 0


async def test_a_canary_failing_one_request_in_five_is_rolled_back(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    split = (
        '[split]\nweights = { "1" = 50, "2" = 50 }\n'
        "[split.rollback]\nwindow_seconds = 30\nmin_requests = 10\nerror_rate_margin = 0.05\n"
    )
    two_versions(models_dir, split, canary_fails_on=7.0)
    async with serve() as s:
        failures = 0
        for i in range(200):
            row = {"features": [7 if i % 5 == 0 else 1, 2, 3, 4]}  # 7: version 2 raises
            answer = await s.client.post(URL, json=row)
            failures += answer.status_code != 200
            shown = (await s.client.get("/v1/admin/models/ab/split")).json()["split"]
            if shown["weights"]["2"] == 0:
                break
        after = [
            (await s.client.post(URL, json={"features": [7, 2, 3, 4]})).json()["model_version"]
            for _ in range(10)
        ]
        metrics = (await s.client.get("/metrics")).text
    assert shown["weights"] == {"1": 50, "2": 0}, shown
    assert "error rate" in shown["rolled_back"]["2"]
    assert i < 120  # well within the window: ~10 of the canary's requests are enough
    assert 0 < failures < 12
    assert after == ["1"] * 10
    assert (
        'inference_split_rollbacks_total{model="ab",reason="error_rate",version="2"} 1.0' in metrics
    )
    assert json.dumps(shown["rolled_back"])  # renders
