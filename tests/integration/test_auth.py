"""API keys and scopes through the whole app, in-process."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.support.models import write_streaming_model

SETOSA = {"features": [5.1, 3.5, 1.4, 0.2]}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_keys_are_required_and_every_failure_looks_the_same(
    serve: Callable[..., Any],
) -> None:
    async with serve(auth="required", key_cache_seconds=0) as s:
        good, _ = await s.app.keys.create("alice", ["predict"])
        revoked, revoked_record = await s.app.keys.create("alice", ["predict"])
        await s.app.keys.revoke(revoked_record.id)
        ok = await s.client.post("/predict", json=SETOSA, headers=bearer(good))
        via_header = await s.client.post("/predict", json=SETOSA, headers={"X-API-Key": good})
        failures = [
            await s.client.post("/predict", json=SETOSA),
            await s.client.post("/predict", json=SETOSA, headers=bearer("nonsense")),
            await s.client.post("/predict", json=SETOSA, headers=bearer(good[:-1] + "x")),
            await s.client.post("/predict", json=SETOSA, headers=bearer(revoked)),
            await s.client.post(
                "/predict", json=SETOSA, headers={"Authorization": f"Basic {good}"}
            ),
        ]
        public = await s.client.get("/health/ready")
        metrics = (await s.client.get("/metrics")).text
    assert ok.status_code == 200
    assert via_header.status_code == 200
    assert {r.status_code for r in failures} == {401}
    assert len({r.text for r in failures}) == 1
    assert failures[0].headers["www-authenticate"].startswith("Bearer")
    assert public.status_code == 200
    assert 'inference_limit_rejections_total{reason="unauthorized"} 5.0' in metrics


async def test_scopes(serve: Callable[..., Any], models_dir: Path) -> None:
    write_streaming_model(models_dir)
    async with serve(auth="required", workers=0) as s:
        predict_only, _ = await s.app.keys.create("bob", ["predict"])
        requests_only, _ = await s.app.keys.create("bob", ["requests"])
        admin, _ = await s.app.keys.create("root", ["admin"])
        forbidden = await s.client.post(
            "/v1/requests", json={"model": "streamer", "input": "x"}, headers=bearer(predict_only)
        )
        allowed = await s.client.post(
            "/v1/requests", json={"model": "streamer", "input": "x"}, headers=bearer(requests_only)
        )
        no_predict = await s.client.post("/predict", json=SETOSA, headers=bearer(requests_only))
        as_admin = await s.client.post("/predict", json=SETOSA, headers=bearer(admin))
    assert forbidden.status_code == 403
    assert "requests" in forbidden.json()["error"]["message"]
    assert allowed.status_code == 202
    assert no_predict.status_code == 403
    assert as_admin.status_code == 200


async def test_users_see_only_their_own_requests(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    write_streaming_model(models_dir)
    async with serve(auth="required", workers=0) as s:
        alice, _ = await s.app.keys.create("alice", ["requests"])
        mallory, _ = await s.app.keys.create("mallory", ["requests"])
        mine = (
            await s.client.post(
                "/v1/requests", json={"model": "streamer", "input": "secret"}, headers=bearer(alice)
            )
        ).json()["id"]
        theirs = [
            await s.client.get(f"/v1/requests/{mine}", headers=bearer(mallory)),
            await s.client.get(f"/v1/requests/{mine}/events", headers=bearer(mallory)),
            await s.client.post(f"/v1/requests/{mine}/cancel", headers=bearer(mallory)),
        ]
        listing = (await s.client.get("/v1/requests", headers=bearer(mallory))).json()
        own = await s.client.get(f"/v1/requests/{mine}", headers=bearer(alice))
    assert [r.status_code for r in theirs] == [404, 404, 404]
    assert listing["requests"] == []
    assert own.status_code == 200
    assert own.json()["user"] == "alice"
    assert own.json()["status"] == "queued"  # mallory's cancel changed nothing


async def test_revocation_takes_effect_without_restart(serve: Callable[..., Any]) -> None:
    async with serve(auth="required", key_cache_seconds=0.2) as s:
        key, record = await s.app.keys.create("carol", ["predict"])
        before = await s.client.post("/predict", json=SETOSA, headers=bearer(key))
        await s.app.keys.revoke(record.id)
        await asyncio.sleep(0.3)
        after = await s.client.post("/predict", json=SETOSA, headers=bearer(key))
    assert before.status_code == 200
    assert after.status_code == 401


async def test_a_key_never_reaches_the_logs(serve: Callable[..., Any]) -> None:
    async with serve(auth="required") as s:
        key, _ = await s.app.keys.create("dave", ["predict"])
        sink = io.BytesIO()
        s.app.access_log._sink._stream = sink
        await s.client.post("/predict", json=SETOSA, headers=bearer(key))
        await s.client.post("/predict", json=SETOSA, headers=bearer(key + "x"))
        s.app.access_log.flush()
    text = sink.getvalue().decode()
    assert text.count('"event":"request"') == 2
    assert key not in text
    assert key[:-6] not in text
