"""Versions over HTTP, in-process: the admin API, versioned predictions, metadata, readiness."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from tests.support.models import write_scripted_model

SETOSA = {"features": [5.1, 3.5, 1.4, 0.2]}


def add_version(models_dir: Path, version: int, name: str = "iris") -> Path:
    """A copy of version 1 of a demo model as ``version``."""
    target = models_dir / name / str(version)
    shutil.copytree(models_dir / name / "1", target)
    return target


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_load_swaps_the_default_and_versions_answer_on_their_own_route(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    async with serve() as s:
        add_version(models_dir, 2)
        loaded = await s.client.post("/v1/admin/models/iris/load")
        by_default = await s.client.post("/predict", json=SETOSA)
        by_name = await s.client.post("/v1/models/iris/predict", json=SETOSA)
        by_version = await s.client.post("/v1/models/iris/versions/2/predict", json=SETOSA)
        old_version = await s.client.post("/v1/models/iris/versions/1/predict", json=SETOSA)
        meta = (await s.client.get("/v1/models/iris")).json()
        metrics = (await s.client.get("/metrics")).text
    assert loaded.status_code == 200
    assert loaded.json()["default_version"] == "2"
    assert [v["version"] for v in loaded.json()["versions"]] == ["2"]
    assert by_default.json()["model_version"] == "2"
    assert by_name.json()["model_version"] == "2"
    assert by_version.status_code == 200
    assert by_version.json()["model_version"] == "2"
    assert by_version.json()["label"] == "setosa"
    assert old_version.status_code == 404
    assert "no version 1 loaded (loaded: 2)" in old_version.json()["error"]["message"]
    assert meta["default_version"] == "2"
    assert meta["versions"][0]["ready"] is True
    assert meta["versions"][0]["load_seconds"] > 0
    assert 'model_version_info{model="iris",runtime="sklearn",version="1"} 0.0' in metrics
    assert 'model_version_info{model="iris",runtime="sklearn",version="2"} 1.0' in metrics
    assert 'inference_model_ready{model="iris",version="2"} 1.0' in metrics
    assert 'inference_model_ready{model="iris",version="1"}' not in metrics
    endpoint = 'endpoint="/v1/models/{name}/versions/{version}/predict"'
    assert f'inference_requests_total{{{endpoint},method="POST",status="200"}} 1.0' in metrics


async def test_a_corrupt_version_is_refused_with_its_reason_and_the_old_one_serves(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    async with serve() as s:
        add_version(models_dir, 2)
        (models_dir / "iris" / "2" / "model.joblib").write_bytes(b"\x80\x04garbage")
        refused = await s.client.post("/v1/admin/models/iris/load")
        still = await s.client.post("/predict", json=SETOSA)
        index = (await s.client.get("/v1/admin/repository")).json()
        meta = (await s.client.get("/v1/models/iris")).json()
        ready = await s.client.get("/health/ready")
        metrics = (await s.client.get("/metrics")).text
    assert refused.status_code == 409
    error = refused.json()["error"]
    assert error["code"] == "model_load_failed"
    assert "iris/2/model.joblib" in error["message"]
    assert still.status_code == 200
    assert still.json()["model_version"] == "1"
    rows = {(r["name"], r["version"]): r for r in index["models"]}
    assert rows[("iris", "1")]["state"] == "READY"
    assert rows[("iris", "1")]["default"] is True
    assert rows[("iris", "2")]["state"] == "UNAVAILABLE"
    assert "iris/2/model.joblib" in rows[("iris", "2")]["reason"]
    assert [(v["version"], v["state"]) for v in meta["versions"]] == [
        ("1", "ready"),
        ("2", "failed"),
    ]
    assert ready.status_code == 200
    assert 'inference_model_load_failures_total{model="iris",version="2"} 1.0' in metrics


async def test_rollback_and_explicit_versions(serve: Callable[..., Any], models_dir: Path) -> None:
    async with serve() as s:
        add_version(models_dir, 2)
        both = await s.client.post("/v1/admin/models/iris/load", json={"versions": [1, 2]})
        back = await s.client.post("/v1/admin/models/iris/default", json={"version": 1})
        answer = await s.client.post("/predict", json=SETOSA)
        v2 = await s.client.post("/v1/models/iris/versions/2/predict", json=SETOSA)
        unknown = await s.client.post("/v1/admin/models/iris/default", json={"version": 7})
        no_model = await s.client.post("/v1/admin/models/tulip/load")
        no_version = await s.client.post("/v1/admin/models/iris/load", json={"versions": [9]})
        bad_bodies = [
            await s.client.post("/v1/admin/models/iris/load", json={"versions": []}),
            await s.client.post("/v1/admin/models/iris/load", json={"versions": ["x"]}),
            await s.client.post("/v1/admin/models/iris/load", json={"version": 2}),
            await s.client.post("/v1/admin/models/iris/default", json={}),
            await s.client.post("/v1/admin/models/iris/default", json={"version": 0}),
        ]
    assert both.status_code == 200
    assert [v["version"] for v in both.json()["versions"]] == ["1", "2"]
    assert both.json()["default_version"] == "2"
    assert back.status_code == 200
    assert back.json()["previous_default"] == "2"
    assert back.json()["default_version"] == "1"
    assert answer.json()["model_version"] == "1"
    assert v2.json()["model_version"] == "2"
    assert unknown.status_code == 404
    assert "no version 7" in unknown.json()["error"]["message"]
    assert no_model.status_code == 404
    assert no_version.status_code == 404
    assert "versions: 1, 2" in no_version.json()["error"]["message"]
    assert [r.status_code for r in bad_bodies] == [422] * 5
    assert all(r.json()["error"]["code"] == "validation_failed" for r in bad_bodies)


async def test_unload_takes_a_model_out_of_service_and_readiness(
    serve: Callable[..., Any],
) -> None:
    async with serve() as s:
        unloaded = await s.client.post("/v1/admin/models/iris-forest/unload")
        gone = await s.client.post("/v1/models/iris-forest/predict", json=SETOSA)
        meta = await s.client.get("/v1/models/iris-forest")
        ready = await s.client.get("/health/ready")
        again = await s.client.post("/v1/admin/models/iris-forest/unload")
        listing = (await s.client.get("/v1/models")).json()
        reloaded = await s.client.post("/v1/admin/models/iris-forest/load")
        back = await s.client.post("/v1/models/iris-forest/predict", json=SETOSA)
        ready_again = await s.client.get("/health/ready")
    assert unloaded.json() == {"name": "iris-forest", "unloaded": True}
    assert gone.status_code == 404
    assert meta.status_code == 404
    assert ready.status_code == 200
    assert ready.json()["models"] == {"iris": "ready"}
    assert again.status_code == 404
    assert [m["name"] for m in listing["models"]] == ["iris"]
    assert reloaded.status_code == 200
    assert back.status_code == 200
    assert ready_again.json()["models"] == {"iris": "ready", "iris-forest": "ready"}


async def test_readiness_per_version(serve: Callable[..., Any], models_dir: Path) -> None:
    write_scripted_model(models_dir, "slow", 1)
    async with serve() as s:
        slow = write_scripted_model(models_dir, "slow", 2, load_delay_s=0.5)
        loading = asyncio.ensure_future(
            s.client.post("/v1/admin/models/slow/load", json={"versions": [1, 2]})
        )
        await asyncio.sleep(0.2)
        while_loading = await s.client.get("/v1/models/slow/versions/2/ready")
        served = await s.client.get("/v1/models/slow/ready")
        predict_v2 = await s.client.post(
            "/v1/models/slow/versions/2/predict", json={"features": [1, 0, 0, 0]}
        )
        await loading
        after = await s.client.get("/v1/models/slow/versions/2/ready")
        version_meta = await s.client.get("/v1/models/slow/versions/2")
        missing = await s.client.get("/v1/models/slow/versions/5/ready")
    assert slow.is_dir()
    assert while_loading.status_code == 503
    assert while_loading.json()["ready"] is False
    assert "still loading" in while_loading.json()["reason"]
    assert served.json() == {"name": "slow", "version": "1", "ready": True}
    assert predict_v2.status_code == 503
    assert predict_v2.json()["error"]["code"] == "model_not_ready"
    assert after.json() == {"name": "slow", "version": "2", "ready": True}
    assert version_meta.json()["version"] == "2"
    assert missing.status_code == 404


async def test_a_request_read_during_the_swap_is_served_by_the_new_version(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    """The request looks its model up before its body arrives; the swap (and the old version's
    drain) happens while it waits for the body; it must still be answered, by version 2."""
    async with serve(request_timeout_ms=10_000) as s:
        add_version(models_dir, 2)
        body_sent = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await body_sent.wait()
            return {"type": "http.request", "body": orjson.dumps(SETOSA), "more_body": False}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/models/iris/predict",
            "headers": [(b"content-type", b"application/json")],
            "query_string": b"",
        }
        request = asyncio.ensure_future(s.app(scope, receive, send))
        await asyncio.sleep(0.05)  # looked up version 1, now waiting for the body
        swapped = await s.client.post("/v1/admin/models/iris/load")  # 1 drained and unloaded
        body_sent.set()
        await request
    assert swapped.status_code == 200
    assert sent[0]["status"] == 200
    answer = json.loads(sent[1]["body"])
    assert answer["model_version"] == "2"
    assert answer["label"] == "setosa"


async def test_admin_routes_need_the_admin_scope(serve: Callable[..., Any]) -> None:
    async with serve(auth="required") as s:
        predict_key, _ = await s.app.keys.create("bob", ["predict"])
        admin_key, _ = await s.app.keys.create("root", ["admin"])
        anonymous = await s.client.get("/v1/admin/repository")
        forbidden = await s.client.post("/v1/admin/models/iris/unload", headers=bearer(predict_key))
        allowed = await s.client.get("/v1/admin/repository", headers=bearer(admin_key))
        versions = await s.client.post(
            "/v1/models/iris/versions/1/predict", json=SETOSA, headers=bearer(predict_key)
        )
        still = await s.client.post("/predict", json=SETOSA, headers=bearer(predict_key))
    assert anonymous.status_code == 401
    assert forbidden.status_code == 403
    assert "'admin' scope" in forbidden.json()["error"]["message"]
    assert allowed.status_code == 200
    assert versions.status_code == 200
    assert still.status_code == 200


async def test_the_repository_watch_loads_a_new_version_by_itself(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    async with serve(watch_repository=True, watch_interval_seconds=0.05) as s:
        add_version(models_dir, 2)
        for _ in range(200):
            if s.app.registry.default_version("iris") == 2:
                break
            await asyncio.sleep(0.02)
        answer = await s.client.post("/predict", json=SETOSA)
    assert answer.json()["model_version"] == "2"


async def test_openapi_documents_the_version_and_admin_routes(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        paths = (await s.client.get("/openapi.json")).json()["paths"]
    for path in (
        "/v1/models/{name}/versions/{version}/predict",
        "/v1/admin/repository",
        "/v1/admin/models/{name}/load",
        "/v1/admin/models/{name}/unload",
        "/v1/admin/models/{name}/default",
    ):
        assert path in paths, path
