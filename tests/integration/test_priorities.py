"""Priorities and fair sharing of a model's queue, through the whole app in-process."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from inferd.errors import ValidationFailed
from tests.support.models import BATCHES, write_scripted_model

SETOSA = {"features": [5.1, 3.5, 1.4, 0.2]}


def bearer(key: str, **extra: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **extra}


async def test_a_key_asks_for_a_priority_up_to_its_own(serve: Callable[..., Any]) -> None:
    async with serve(auth="required") as s:
        normal, _ = await s.app.keys.create("alice", ["predict"])
        high, high_record = await s.app.keys.create("ops", ["predict"], priority="High")
        asks_more = await s.client.post(
            "/predict", json=SETOSA, headers=bearer(normal, **{"X-Inferd-Priority": "high"})
        )
        asks_less = await s.client.post(
            "/predict", json=SETOSA, headers=bearer(normal, **{"X-Inferd-Priority": "low"})
        )
        nonsense = await s.client.post(
            "/predict", json=SETOSA, headers=bearer(normal, **{"X-Inferd-Priority": "urgent"})
        )
        v2 = await s.client.post(
            "/v2/models/iris/infer",
            json={"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [1] * 4}]},
            headers=bearer(normal, **{"X-Inferd-Priority": "high"}),
        )
        own = await s.client.post("/predict", json=SETOSA, headers=bearer(high))
        listed = {key.id: key.public() for key in await s.app.keys.list()}
    assert asks_more.status_code == 403
    assert asks_more.json()["error"]["code"] == "forbidden"
    assert "may ask for priority normal or lower, not high" in asks_more.json()["error"]["message"]
    assert asks_less.status_code == 200
    assert nonsense.status_code == 400
    assert "X-Inferd-Priority: priority must be one of high, normal, low" in nonsense.text
    assert v2.status_code == 403  # the same rule on every route of the data plane
    assert own.status_code == 200
    assert listed[high_record.id]["priority"] == "high"
    assert {row["priority"] for row in listed.values()} == {"high", "normal"}


async def test_a_key_with_an_unknown_priority_is_refused(serve: Callable[..., Any]) -> None:
    async with serve(auth="required") as s:
        with pytest.raises(ValidationFailed, match="priority must be one of high, normal, low"):
            await s.app.keys.create("alice", ["predict"], priority="urgent")


async def _queued_behind_a_blocker(
    client: httpx.AsyncClient,
    model: str,
    requests: list[tuple[float, dict[str, str]]],
    blocker_headers: dict[str, str] | None = None,
) -> list[httpx.Response]:
    """One request that occupies the model, then ``requests`` (first feature, headers) queued
    behind it in this order; their answers."""
    path = f"/v1/models/{model}/predict"
    BATCHES.pop(model, None)  # (the batches of the warm-up at load)
    blocker = asyncio.ensure_future(
        client.post(path, json={"features": [-1, 0, 0, 0]}, headers=blocker_headers)
    )
    for _ in range(2000):  # until the blocker is in the model
        if BATCHES.get(model):
            break
        await asyncio.sleep(0.005)
    queued = []
    for first, headers in requests:
        queued.append(
            asyncio.ensure_future(
                client.post(path, json={"features": [first, 0, 0, 0]}, headers=headers)
            )
        )
        await asyncio.sleep(0.01)  # in this order
    return list(await asyncio.gather(blocker, *queued))


async def test_high_priority_requests_are_batched_first(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    write_scripted_model(models_dir, "prio", batching={"max_batch_size": 2}, delay_s=0.4)
    low = {"X-Inferd-Priority": "low"}
    high = {"X-Inferd-Priority": "high"}
    async with serve(request_timeout_ms=20000) as s:  # no keys: the header is honoured as sent
        answers = await _queued_behind_a_blocker(
            s.client, "prio", [(1, low), (2, {}), (3, {}), (4, high), (5, high)]
        )
    assert [r.status_code for r in answers] == [200] * 6
    assert BATCHES["prio"] == [[-1.0], [4.0, 5.0], [2.0, 3.0], [1.0]]


async def test_one_key_flooding_a_model_does_not_push_another_back(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    write_scripted_model(models_dir, "shared", batching={"max_batch_size": 4}, delay_s=0.3)
    orders = {}
    for fair in (True, False):
        async with serve(auth="required", fair_sharing=fair, request_timeout_ms=20000) as s:
            heavy, _ = await s.app.keys.create("heavy", ["predict"])
            light, _ = await s.app.keys.create("light", ["predict"])
            answers = await _queued_behind_a_blocker(
                s.client,
                "shared",
                [(float(i), bearer(heavy)) for i in range(10)]
                + [(100.0, bearer(light)), (101.0, bearer(light))],
                bearer(heavy),
            )
        assert [r.status_code for r in answers] == [200] * 13
        orders[fair] = BATCHES["shared"][1:]
    # Fair: the light key's two requests share the first batch after the blocker with two of
    # the heavy key's; in one queue they wait for all ten of them.
    assert sorted(orders[True][0]) == [0.0, 1.0, 100.0, 101.0]
    assert orders[False] == [[0.0, 1.0, 2.0, 3.0], [4.0, 5.0, 6.0, 7.0], [8.0, 9.0, 100.0, 101.0]]
