"""Health, readiness, metrics and access logs of the running app."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import orjson

from tests.support.models import write_scripted_model

SETOSA = [5.1, 3.5, 1.4, 0.2]

DOCUMENTED_METRICS = (
    "inference_request_latency_seconds",
    "inference_batch_size",
    "inference_batch_latency_seconds",
    "inference_queue_depth",
    "inference_queue_rejections_total",
    "inference_request_timeouts_total",
    "inference_requests_total",
    "inference_request_duration_seconds",
    "prediction_value_distribution",
    "model_version_info",
)


async def test_health_routes(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        health = await s.client.get("/health")
        live = await s.client.get("/health/live")
        ready = await s.client.get("/health/ready")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert live.status_code == 200
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "models": {"iris": "ready", "iris-forest": "ready"}}


async def test_not_ready_until_every_model_is_warm(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    write_scripted_model(models_dir, "sluggish", load_delay_s=0.5)
    async with serve(wait_ready=False) as s:
        early = await s.client.get("/health/ready")
        still_loading = await s.client.post(
            "/v1/models/sluggish/predict", json={"features": [1, 0, 0, 0]}
        )
        live = await s.client.get("/health/live")
        await s.app.wait_ready(within=10)
        late = await s.client.get("/health/ready")
    assert early.status_code == 503
    assert early.json()["status"] == "not_ready"
    assert early.json()["models"]["sluggish"] in ("loading", "pending")
    assert still_loading.status_code == 503
    assert still_loading.json()["error"]["code"] == "model_not_ready"
    assert live.status_code == 200
    assert late.status_code == 200


async def test_failed_load_is_reported_and_fatal(
    serve: Callable[..., Any], models_dir: Path, make_settings: Callable[..., Any]
) -> None:
    (models_dir / "iris-forest" / "1" / "model.joblib").write_bytes(b"not a model at all")
    from asgi_lifespan import LifespanManager

    from inferd.app import create_app

    fatal: list[BaseException] = []
    app = create_app(make_settings(), on_fatal=fatal.append)
    async with LifespanManager(app):
        for _ in range(200):
            if fatal:
                break
            await asyncio.sleep(0.02)
        import httpx

        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://x") as client:
            ready = await client.get("/health/ready")
    assert fatal, "a corrupt artifact must stop start-up"
    assert "iris-forest/1/model.joblib" in str(fatal[0])
    assert ready.status_code == 503
    assert "iris-forest/1/model.joblib" in ready.json()["error"]


async def test_metrics_expose_every_documented_family(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        for _ in range(3):
            await s.client.post("/predict", json={"features": SETOSA})
        await s.client.post("/predict", json={"features": [1]})
        r = await s.client.get("/metrics")
    text = r.text
    assert r.headers["content-type"].startswith("text/plain")
    for name in DOCUMENTED_METRICS:
        assert f"# TYPE {name} " in text, name
    assert 'inference_request_latency_seconds_count{model="iris",version="1"} 3.0' in text
    assert 'inference_batch_size_sum{model="iris",version="1"}' in text
    assert 'model_version_info{model="iris",runtime="sklearn",version="1"} 1.0' in text
    assert 'inference_requests_total{endpoint="/predict",method="POST",status="200"} 3.0' in text
    assert 'inference_requests_total{endpoint="/predict",method="POST",status="422"} 1.0' in text
    assert 'inference_queue_depth{model="iris",version="1"} 0.0' in text
    assert 'prediction_value_distribution_count{model="iris",version="1"} 3.0' in text
    assert 'inference_request_latency_seconds_bucket{le="0.001"' in text


async def test_route_templates_keep_metric_labels_bounded(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        for name in ("iris", "iris-forest", "nope"):
            await s.client.post(f"/v1/models/{name}/predict", json={"features": SETOSA})
            await s.client.get(f"/v1/models/{name}")
        await s.client.get("/does/not/exist")
        text = (await s.client.get("/metrics")).text
    assert 'endpoint="/v1/models/{name}/predict"' in text
    assert 'endpoint="/v1/models/{name}"' in text
    assert 'endpoint="unmatched"' in text
    assert 'endpoint="/v1/models/nope' not in text


async def test_access_log_lines_carry_the_documented_fields(
    serve: Callable[..., Any],
) -> None:
    async with serve() as s:
        sink = io.BytesIO()
        s.app.access_log._sink._stream = sink
        await s.client.post(
            "/predict", json={"features": SETOSA}, headers={"X-Request-ID": "log-me"}
        )
        await s.client.post("/predict", json={"features": [1, 2]})
        s.app.access_log.flush()
    lines = [orjson.loads(line) for line in sink.getvalue().splitlines()]
    ok, bad = lines[0], lines[1]
    for key in (
        "timestamp", "level", "request_id", "method", "path", "status_code", "latency_ms",
        "queue_depth", "batch_size", "detail",
    ):  # fmt: skip
        assert key in ok, key
    assert ok["request_id"] == "log-me"
    assert ok["status_code"] == 200
    assert ok["batch_size"] == 1
    assert ok["queue_depth"] == 0
    assert ok["path"] == "/predict"
    assert ok["latency_ms"] > 0
    assert bad["status_code"] == 422
    assert "expects 4" in bad["detail"]


async def test_request_metrics_and_lines_wait_for_a_batch_only_under_load(
    serve: Callable[..., Any],
) -> None:
    async with serve() as s:
        app = s.app
        served = app.metrics.requests.labels("/predict", "POST", "200")
        await s.client.post("/predict", json={"features": SETOSA})
        # Alone: applied as the request ended, without a collection or a flush.
        assert served._value.get() == 1.0
        assert app.access_log._pending == []

        # Beside a request still being read: noted, applied in a batch (here: the collection).
        release = asyncio.Event()

        async def body() -> AsyncIterator[bytes]:
            yield b'{"features": '
            await release.wait()
            yield orjson.dumps(SETOSA) + b"}"

        held = asyncio.create_task(
            s.client.post("/predict", content=body(), headers={"content-type": "application/json"})
        )
        await asyncio.sleep(0.05)
        await s.client.post("/predict", json={"features": SETOSA})
        assert served._value.get() == 1.0
        assert len(app.access_log._pending) == 1
        release.set()
        assert (await held).status_code == 200
        text = (await s.client.get("/metrics")).text
    assert 'inference_requests_total{endpoint="/predict",method="POST",status="200"} 3.0' in text
