"""Per-key rate limits and daily token budgets through the whole app, in-process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from inferd.tenancy.limits_memory import MemoryLimiter
from tests.support.models import write_streaming_model

SETOSA = [5.1, 3.5, 1.4, 0.2]


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_rate_limit_gives_429_with_headers(serve: Callable[..., Any]) -> None:
    async with serve(auth="required") as s:
        key, _ = await s.app.keys.create("alice", ["predict"], rate="3/m")
        answers = [
            await s.client.post("/predict", json={"features": SETOSA}, headers=bearer(key))
            for _ in range(5)
        ]
        usage = (await s.client.get("/v1/usage", headers=bearer(key))).json()
        metrics = (await s.client.get("/metrics")).text
    assert [r.status_code for r in answers] == [200, 200, 200, 429, 429]
    first, refused = answers[0], answers[3]
    assert first.headers["ratelimit-policy"] == '"rate";q=3;w=60'
    assert first.headers["ratelimit"].startswith('"rate";r=2;t=')
    assert refused.json()["error"]["code"] == "rate_limited"
    assert refused.json()["error"]["retryable"] is True
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["ratelimit"].startswith('"rate";r=0;')
    assert "3 requests per minute" in refused.json()["error"]["message"]
    assert usage["rate"] == "3/m"
    assert 'inference_limit_rejections_total{reason="rate"} 2.0' in metrics


async def test_daily_budget_counts_rows_and_resets_at_midnight(
    serve: Callable[..., Any],
) -> None:
    now = [1_700_000_000.0]  # 2023-11-14 22:13:20 UTC
    async with serve(auth="required") as s:
        s.app.enforcer.limiter = MemoryLimiter(clock=lambda: now[0])
        key, _ = await s.app.keys.create("bob", ["predict"], daily_tokens=5)
        three = {"instances": [SETOSA] * 3}
        first = await s.client.post("/v1/models/iris/predict", json=three, headers=bearer(key))
        second = await s.client.post("/v1/models/iris/predict", json=three, headers=bearer(key))
        usage = (await s.client.get("/v1/usage", headers=bearer(key))).json()
        now[0] += 2 * 3600  # past UTC midnight
        after_reset = await s.client.post(
            "/v1/models/iris/predict", json=three, headers=bearer(key)
        )
    assert first.status_code == 200
    assert '"daily";q=5;w=86400' in first.headers["ratelimit-policy"]
    assert '"daily";r=2;' in first.headers["ratelimit"]
    assert second.status_code == 429
    error = second.json()["error"]
    assert error["code"] == "quota_exceeded"
    assert "resets at 2023-11-15T00:00:00+00:00" in error["message"]
    assert int(second.headers["retry-after"]) == 6400
    assert usage["tokens_used_today"] == 3
    assert usage["tokens_left_today"] == 2
    assert after_reset.status_code == 200


async def test_long_running_requests_are_charged_once_per_request(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    write_streaming_model(models_dir)
    async with serve(auth="required", workers=0) as s:
        key, _ = await s.app.keys.create("carol", ["requests"], daily_tokens=2)
        body = {"model": "iris", "input": {"instances": [SETOSA, SETOSA]}}
        headers = {**bearer(key), "Idempotency-Key": "once"}
        first = await s.client.post("/v1/requests", json=body, headers=headers)
        replay = await s.client.post("/v1/requests", json=body, headers=headers)
        other = await s.client.post(
            "/v1/requests", json={"model": "iris", "input": {"features": SETOSA}},
            headers=bearer(key),
        )  # fmt: skip
        usage = (await s.client.get("/v1/usage", headers=bearer(key))).json()
    assert first.status_code == 202
    assert replay.status_code == 202
    assert replay.json()["id"] == first.json()["id"]
    assert other.status_code == 429
    assert usage["tokens_used_today"] == 2


async def test_limits_fail_closed_when_asked(serve: Callable[..., Any]) -> None:
    async with serve(
        auth="required", redis_url="redis://127.0.0.1:1/0", limits_fail_open=False
    ) as s:
        key, _ = await s.app.keys.create("dave", ["predict"], rate="10/s")
        refused = await s.client.post("/predict", json={"features": SETOSA}, headers=bearer(key))
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "limiter_unavailable"


async def test_limits_fail_open_by_default(serve: Callable[..., Any]) -> None:
    async with serve(auth="required", redis_url="redis://127.0.0.1:1/0") as s:
        key, _ = await s.app.keys.create("erin", ["predict"], rate="10/s")
        allowed = await s.client.post("/predict", json={"features": SETOSA}, headers=bearer(key))
    assert allowed.status_code == 200


async def test_usage_is_recorded_per_model_in_sql_and_survives_a_restart(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    from tests.support.models import write_scripted_model

    write_scripted_model(models_dir, "slow", delay_s=0.3)
    async with serve(auth="required") as s:
        key, _ = await s.app.keys.create("frank", ["predict"], daily_tokens=100)
        auth = bearer(key)
        for _ in range(2):
            ok = await s.client.post(
                "/v1/models/iris/predict", json={"instances": [SETOSA] * 3}, headers=auth
            )
            assert ok.status_code == 200
        timed_out = await s.client.post(
            "/v1/models/slow/predict",
            json={"features": [1, 0, 0, 0]},
            headers={**auth, "X-Request-Timeout-Ms": "50"},
        )
        usage = (await s.client.get("/v1/usage", headers=auth)).json()
    assert timed_out.status_code == 504
    assert usage["tokens_used_today"] == 6  # the 504 was refunded
    assert usage["models"] == {"iris": {"requests": 2, "tokens": 6}}
    async with serve(auth="required") as s:
        again = (await s.client.get("/v1/usage", headers=auth)).json()
    assert again["models"] == {"iris": {"requests": 2, "tokens": 6}}


async def test_long_running_requests_settle_what_they_used(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    import asyncio

    write_streaming_model(models_dir)
    async with serve(auth="required", workers=1, poll_seconds=0.05) as s:
        key, _ = await s.app.keys.create("gina", ["requests"], daily_tokens=50)
        auth = bearer(key)
        r = await s.client.post(
            "/v1/requests",
            json={"model": "streamer", "input": "x", "parameters": {"chunks": 4}},
            headers=auth,
        )
        request_id = r.json()["id"]
        for _ in range(200):
            record = (await s.client.get(f"/v1/requests/{request_id}", headers=auth)).json()
            if record["status"] == "succeeded":
                break
            await asyncio.sleep(0.02)
        for _ in range(100):  # the worker settles right after it records the outcome
            usage = (await s.client.get("/v1/usage", headers=auth)).json()
            if usage["models"] and usage["tokens_used_today"] == 4:
                break
            await asyncio.sleep(0.05)
    assert record["status"] == "succeeded"
    assert usage["tokens_used_today"] == 4  # reserved 1, settled at the 4 chunks produced
    assert usage["models"] == {"streamer": {"requests": 1, "tokens": 4}}
