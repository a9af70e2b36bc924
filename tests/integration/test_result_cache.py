"""The result cache through the whole app: hits skip the model, bodies match, swaps start
afresh; in process and in Redis."""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from tests.support.models import BATCHES, write_scripted_model

REDIS_URL = "redis://127.0.0.1:6379/0"


def cached_model(models_dir: Path, name: str, version: int = 1, **cache: Any) -> None:
    write_scripted_model(models_dir, name, version)
    table = {"max_entries": 100, "ttl_seconds": 60, **cache}
    lines = ["[cache]", *(f"{key} = {value!r}" for key, value in table.items())]
    toml = models_dir / name / "model.toml"
    toml.write_text(toml.read_text() + "\n".join(lines) + "\n")


def sample(metrics: Any, model: str, result: str) -> float:
    value = metrics.registry.get_sample_value(
        "inference_cache_requests_total", {"model": model, "result": result}
    )
    return value or 0.0


def without_id(body: bytes) -> dict[str, Any]:
    payload: dict[str, Any] = orjson.loads(body)
    payload.pop("request_id", None)
    return payload


async def test_a_hit_skips_the_model_and_answers_the_same_body(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    cached_model(models_dir, "cached")
    async with serve() as s:
        BATCHES.pop("cached", None)  # not the warm-up batch
        url = "/v1/models/cached/predict"
        miss = await s.client.post(url, json={"features": [1, 2, 3, 4]})
        # The same row in another spelling, and in the batch form: the same answer.
        hit = await s.client.post(url, content=b'{"features": [1.0, 2.0, 3e0, 4]}',
                                  headers={"content-type": "application/json"})  # fmt: skip
        batch = await s.client.post(url, json={"instances": [[1, 2, 3, 4]]})
        other = await s.client.post(url, json={"features": [2, 2, 3, 4]})
        v2 = await s.client.post(
            "/v2/models/cached/infer",
            json={"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64",
                              "data": [1, 2, 3, 4]}]},
        )  # fmt: skip
        metrics = s.app.metrics
        text = (await s.client.get("/metrics")).text
    assert miss.status_code == hit.status_code == batch.status_code == 200
    assert without_id(hit.content) == without_id(miss.content)
    assert batch.json()["predictions"][0]["prediction"] == miss.json()["prediction"]
    assert other.json()["prediction"] != miss.json()["prediction"]
    assert v2.status_code == 200, v2.text
    assert BATCHES["cached"] == [[1.0], [2.0]]  # two rows ever reached the model
    assert sample(metrics, "cached", "hit") == 3
    assert sample(metrics, "cached", "miss") == 2
    assert 'inference_cache_requests_total{model="cached",result="hit"} 3.0' in text


async def test_models_without_a_cache_table_are_not_cached(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    write_scripted_model(models_dir, "plain")
    async with serve() as s:
        BATCHES.pop("plain", None)  # not the warm-up batch
        for _ in range(3):
            ok = await s.client.post("/v1/models/plain/predict", json={"features": [1, 2, 3, 4]})
            assert ok.status_code == 200
        metrics = s.app.metrics
    assert len(BATCHES["plain"]) == 3
    assert sample(metrics, "plain", "miss") == sample(metrics, "plain", "hit") == 0


async def test_answers_expire_and_the_entries_are_bounded(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    cached_model(models_dir, "small", max_entries=2, ttl_seconds=0.3)
    async with serve() as s:
        BATCHES.pop("small", None)  # not the warm-up batch
        url = "/v1/models/small/predict"
        for first in (0, 1, 2, 0):  # 0 is pushed out by 2
            assert (await s.client.post(url, json={"features": [first, 0, 0, 0]})).is_success
        assert (await s.client.post(url, json={"features": [2, 0, 0, 0]})).is_success  # hit
        await asyncio.sleep(0.35)
        assert (await s.client.post(url, json={"features": [2, 0, 0, 0]})).is_success  # expired
    assert [b[0] for b in BATCHES["small"]] == [0.0, 1.0, 2.0, 0.0, 2.0]


async def test_a_swap_never_serves_the_old_versions_answers(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    cached_model(models_dir, "swapped")
    async with serve() as s:
        BATCHES.pop("swapped", None)  # not the warm-up batch
        url = "/v1/models/swapped/predict"
        body = {"features": [1, 2, 3, 4]}
        first = await s.client.post(url, json=body)
        again = await s.client.post(url, json=body)
        cached_model(models_dir, "swapped", 2)
        assert (await s.client.post("/v1/admin/models/swapped/load")).is_success
        after = await s.client.post(url, json=body)
        after_again = await s.client.post(url, json=body)
        pinned_old = await s.client.post("/v1/models/swapped/versions/1/predict", json=body)
    assert first.json()["model_version"] == again.json()["model_version"] == "1"
    assert after.json()["model_version"] == after_again.json()["model_version"] == "2"
    assert pinned_old.status_code == 404  # version 1 is no longer served
    # One miss per version (the others are version 2's check and warm-up batches).
    assert BATCHES["swapped"].count([1.0]) == 2


@pytest.fixture
def redis_url() -> str:
    """Redis on loopback: skipped where unreachable, unless INFERD_TEST_REQUIRE_SERVICES=1."""
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1, socket_timeout=1).ping()
    except (redis.RedisError, OSError) as exc:
        if os.environ.get("INFERD_TEST_REQUIRE_SERVICES") == "1":
            pytest.fail(f"Redis is required for this test: {exc!r}")
        pytest.skip(f"Redis is not reachable: {exc!r}")
    return REDIS_URL


async def test_in_redis_answers_are_shared_between_processes_and_bounded(
    serve: Callable[..., Any], models_dir: Path, redis_url: str
) -> None:
    name = f"shared{secrets.token_hex(4)}"  # the keys of this test only
    cached_model(models_dir, name, max_entries=3)
    url = f"/v1/models/{name}/predict"
    try:
        async with serve(redis_url=redis_url, result_cache="redis") as first:
            BATCHES.pop(name, None)  # not the warm-up batch
            miss = await first.client.post(url, json={"features": [1, 2, 3, 4]})
            await first.app.plane.cache.store.flush()  # type: ignore[attr-defined]
        async with serve(redis_url=redis_url, result_cache="redis") as second:
            BATCHES.pop(name, None)
            hit = await second.client.post(url, json={"features": [1, 2, 3, 4]})
            for i in range(5):
                await second.client.post(url, json={"features": [10 + i, 0, 0, 0]})
            await second.app.plane.cache.store.flush()  # type: ignore[attr-defined]
            metrics = second.app.metrics
        client = redis.Redis.from_url(redis_url)
        base = f"inferd:cache:{{{name}}}:"
        held = client.zcard(base + "index")
        total = int(client.get(base + "bytes") or 0)
        sizes = sum(int(v) for v in client.hvals(base + "sizes"))
    finally:
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(f"inferd:cache:{{{name}}}:*"))
        if keys:
            client.delete(*keys)
    assert miss.status_code == hit.status_code == 200
    assert without_id(hit.content) == without_id(miss.content)
    assert sample(metrics, name, "hit") == 1
    assert [1.0] not in BATCHES[name]  # the first process's answer, from Redis
    assert len(BATCHES[name]) == 5
    assert held == 3  # max_entries holds in Redis too
    assert total == sizes > 0


async def test_redis_down_means_misses_not_errors(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    cached_model(models_dir, "nored")
    async with serve(redis_url="redis://127.0.0.1:1/0", result_cache="redis") as s:
        answers = [
            await s.client.post("/v1/models/nored/predict", json={"features": [1, 2, 3, 4]})
            for _ in range(2)
        ]
        metrics = s.app.metrics
    assert [a.status_code for a in answers] == [200, 200]
    assert sample(metrics, "nored", "miss") == 2
