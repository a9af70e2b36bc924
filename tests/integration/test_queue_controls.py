"""The queue controls of long-running requests through the whole app: the bounded queue
(503, 429), request TTL, deduplication, dead letters and their requeue, and the metrics."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from tests.integration.test_requests_api import fast, parse_sse, wait_terminal
from tests.support.models import write_streaming_model


def metric(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus exposition ``text`` (0 when absent)."""
    wanted = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))  # as exposed
    pattern = rf"^{re.escape(name)}(?:\{{{re.escape(wanted)}\}})? (\S+)$"
    found = re.search(pattern, text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


def with_dedup(models_dir: Path, **behaviour: Any) -> None:
    write_streaming_model(models_dir, **behaviour)
    toml = models_dir / "streamer" / "model.toml"
    toml.write_text(toml.read_text() + "[jobs]\ndedup = true\ndedup_ttl_seconds = 600\n")


async def test_a_full_queue_refuses_with_503_and_drops_nothing(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    write_streaming_model(models_dir)
    async with serve(**fast(workers=0, max_queued_requests=2, retry_after_s=3)) as s:
        post = s.client.post
        accepted = [
            await post("/v1/requests", json={"model": "streamer", "input": "x"}) for _ in range(2)
        ]
        full = await post("/v1/requests", json={"model": "streamer", "input": "x"})
        other = await post(
            "/v1/requests", json={"model": "iris", "input": {"features": [1, 2, 3, 4]}}
        )
        listed = (await s.client.get("/v1/requests")).json()["requests"]
        metrics = (await s.client.get("/metrics")).text
    assert [r.status_code for r in accepted] == [202, 202]
    assert full.status_code == 503
    assert full.headers["retry-after"] == "3"
    assert full.json()["error"]["code"] == "queue_full"
    assert full.json()["error"]["retryable"] is True
    assert "full" in full.json()["error"]["message"]
    assert other.status_code == 202  # another model's queue
    assert sorted(r["id"] for r in listed) == sorted(
        [r.json()["id"] for r in accepted] + [other.json()["id"]]
    )
    assert all(r["status"] == "queued" for r in listed)
    assert (
        metric(metrics, "inference_job_rejections_total", model="streamer", reason="queue_full")
        == 1
    )


async def test_the_model_toml_bound_wins(serve: Callable[..., Any], models_dir: Path) -> None:
    write_streaming_model(models_dir)
    toml = models_dir / "streamer" / "model.toml"
    toml.write_text(toml.read_text() + "[jobs]\nmax_queued_requests = 1\n")
    async with serve(**fast(workers=0, max_queued_requests=100)) as s:
        codes = [
            (
                await s.client.post("/v1/requests", json={"model": "streamer", "input": "x"})
            ).status_code
            for _ in range(2)
        ]
    assert codes == [202, 503]


async def test_a_request_not_started_in_time_expires_with_a_terminal_event(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    write_streaming_model(models_dir)
    async with serve(**fast(workers=0, expiry_interval_seconds=0.05)) as s:
        r = await s.client.post(
            "/v1/requests", json={"model": "streamer", "input": "x", "ttl_seconds": 0.3}
        )
        assert r.status_code == 202, r.text
        accepted = r.json()
        assert accepted["expires_at"] is not None
        events = await asyncio.wait_for(s.client.get(accepted["events_url"]), 10)
        record = await wait_terminal(s.client, accepted["id"])
        metrics = (await s.client.get("/metrics")).text
    frames = parse_sse(events.text)
    assert [f["event"] for f in frames] == ["status", "error"]
    assert frames[-1]["data"]["status"] == "expired"
    assert record["status"] == "expired" and record["attempts"] == 0
    assert record["expires_at"] == accepted["expires_at"]
    assert metric(metrics, "inference_jobs_expired_total", model="streamer") == 1
    assert metric(metrics, "inference_jobs", status="expired") in (0, 1)  # read every 5 s


async def test_the_default_ttl_and_expires_at(serve: Callable[..., Any], models_dir: Path) -> None:
    write_streaming_model(models_dir)
    soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
    async with serve(**fast(workers=0, request_ttl_seconds=120)) as s:
        post = s.client.post
        default = (await post("/v1/requests", json={"model": "streamer", "input": "x"})).json()
        given = (
            await post("/v1/requests", json={"model": "streamer", "input": "x", "expires_at": soon})
        ).json()
        bad = [
            await post("/v1/requests", json={"model": "streamer", "input": "x", **extra})
            for extra in (
                {"ttl_seconds": 0},
                {"ttl_seconds": 1e300},
                {"ttl_seconds": "10"},
                {"expires_at": "tomorrow"},
                {"expires_at": "2030-01-01T00:00:00"},
                {"expires_at": soon, "ttl_seconds": 5},
            )
        ]
    created = datetime.fromisoformat(default["created_at"])
    expires = datetime.fromisoformat(default["expires_at"])
    assert abs((expires - created).total_seconds() - 120) < 1
    assert datetime.fromisoformat(given["expires_at"]) == datetime.fromisoformat(soon)
    assert [r.status_code for r in bad] == [422] * 6
    assert all(r.json()["error"]["code"] == "validation_failed" for r in bad)
    assert "time zone" in bad[4].json()["error"]["message"]


async def test_dedup_answers_from_the_stored_result(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    with_dedup(models_dir)
    body = {"model": "streamer", "input": "same", "parameters": {"chunks": 2}}
    async with serve(**fast()) as s:
        first = (await s.client.post("/v1/requests", json=body)).json()
        done = await wait_terminal(s.client, first["id"])
        r = await s.client.post("/v1/requests", json=body)
        again = r.json()
        record = (await s.client.get(f"/v1/requests/{again['id']}")).json()
        events = parse_sse((await s.client.get(again["events_url"])).text)
        other = (await s.client.post("/v1/requests", json={**body, "input": "else"})).json()
        metrics = (await s.client.get("/metrics")).text
    assert first["deduplicated"] is False and done["status"] == "succeeded"
    assert r.status_code == 202
    assert again["id"] != first["id"]
    assert again["deduplicated"] is True and again["deduplicated_from"] == first["id"]
    assert again["status"] == "succeeded" and again["result"] == done["result"]
    assert record["result"] == done["result"] and record["deduplicated"] is True
    assert [x["response"] for x in record["responses"]] == ["same-0", "same-1"]
    assert [f["event"] for f in events] == ["response", "response", "done"]
    assert other["deduplicated"] is False
    assert metric(metrics, "inference_jobs_deduplicated_total", model="streamer", kind="hit") == 1


async def test_dedup_joins_a_running_request(serve: Callable[..., Any], models_dir: Path) -> None:
    with_dedup(models_dir, chunk_delay_s=0.1)
    body = {"model": "streamer", "input": "slow", "parameters": {"chunks": 3}}
    async with serve(**fast(workers=2)) as s:
        first = (await s.client.post("/v1/requests", json=body)).json()
        joined = (await s.client.post("/v1/requests", json=body)).json()
        follow = asyncio.ensure_future(s.client.get(joined["events_url"]))
        original = await wait_terminal(s.client, first["id"])
        record = await wait_terminal(s.client, joined["id"])
        frames = parse_sse((await asyncio.wait_for(follow, 10)).text)
        metrics = (await s.client.get("/metrics")).text
    assert joined["deduplicated"] is True and joined["deduplicated_from"] == first["id"]
    assert joined["status"] == "queued"
    assert original["status"] == record["status"] == "succeeded"
    assert record["result"] == original["result"]
    assert record["attempts"] == 0  # it never ran: the original's run answered it
    assert [x["response"] for x in record["responses"]] == ["slow-0", "slow-1", "slow-2"]
    assert frames[-1]["event"] == "done"
    assert [f["data"]["response"] for f in frames if f["event"] == "response"] == [
        "slow-0",
        "slow-1",
        "slow-2",
    ]
    runs = metric(metrics, "inference_job_runs_total", model="streamer", outcome="succeeded")
    assert runs == 1  # run once for both
    assert metric(metrics, "inference_tokens_processed_total", model="streamer") == 3


async def test_an_admin_lists_and_requeues_a_dead_request(
    serve: Callable[..., Any], models_dir: Path, tmp_path: Path
) -> None:
    write_streaming_model(models_dir, state_dir=str(tmp_path))
    async with serve(**fast(max_attempts=1)) as s:
        dead_id = (
            await s.client.post("/v1/requests", json={"model": "streamer", "input": "flaky:1"})
        ).json()["id"]
        dead = await wait_terminal(s.client, dead_id)
        listed = (await s.client.get("/v1/admin/requests")).json()
        bad = await s.client.get("/v1/admin/requests", params={"status": "running"})
        requeued = await s.client.post(
            f"/v1/admin/requests/{dead_id}/requeue", json={"attempts": 2}
        )
        record = await wait_terminal(s.client, dead_id)
        again = await s.client.post(f"/v1/admin/requests/{dead_id}/requeue")
        missing = await s.client.post("/v1/admin/requests/req_01ARZ3NDEKTSV4RRFFQ69G5FAV/requeue")
        events = parse_sse(
            (
                await s.client.get(f"/v1/requests/{dead_id}/events", headers={"Last-Event-ID": "3"})
            ).text
        )
    assert dead["status"] == "dead"
    assert [r["id"] for r in listed["requests"]] == [dead_id]
    assert bad.status_code == 400
    assert requeued.status_code == 200, requeued.text
    assert requeued.json()["status"] == "queued" and requeued.json()["max_attempts"] == 3
    assert record["status"] == "succeeded" and record["attempts"] == 2
    assert again.status_code == 409 and again.json()["error"]["code"] == "invalid_state"
    assert missing.status_code == 404
    assert next(f["data"].get("reason") for f in events if f["event"] == "status") == (
        "requeued by an admin"
    )


async def test_a_key_past_its_queued_bound_gets_429_and_others_go_on(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    write_streaming_model(models_dir)
    body = {"model": "streamer", "input": "x"}
    async with serve(auth="required", workers=0, max_queued_requests_per_key=2) as s:
        alice, _ = await s.app.keys.create("alice", ["requests"])
        bob, _ = await s.app.keys.create("bob", ["requests"])
        user = {"Authorization": f"Bearer {alice}"}
        admin_key, _ = await s.app.keys.create("root", ["admin"])
        admin = {"Authorization": f"Bearer {admin_key}"}
        mine = [await s.client.post("/v1/requests", json=body, headers=user) for _ in range(3)]
        other = await s.client.post(
            "/v1/requests", json=body, headers={"Authorization": f"Bearer {bob}"}
        )
        not_admin = await s.client.get("/v1/admin/requests", headers=user)
        as_admin = await s.client.get("/v1/admin/requests", headers=admin)
    assert [r.status_code for r in mine] == [202, 202, 429]
    assert mine[2].json()["error"]["code"] == "too_many_queued"
    assert "retry-after" in mine[2].headers
    assert other.status_code == 202
    assert not_admin.status_code == 403  # dead letters are every user's: the admin scope
    assert as_admin.status_code == 200


async def test_openapi_declares_the_queue_controls(serve: Callable[..., Any]) -> None:
    async with serve(workers=0) as s:
        schema = (await s.client.get("/openapi.json")).json()
    submit = schema["paths"]["/v1/requests"]["post"]
    body = submit["requestBody"]["content"]["application/json"]["schema"]
    assert {"ttl_seconds", "expires_at"} <= set(body["properties"])
    assert {"429", "503"} <= set(submit["responses"])
    record = schema["components"]["schemas"]["RequestDoc"]["properties"]
    assert "expired" in record["status"]["enum"]
    assert {"deduplicated", "deduplicated_from", "expires_at"} <= set(record)
    assert "/v1/admin/requests" in schema["paths"]
    assert "post" in schema["paths"]["/v1/admin/requests/{request_id}/requeue"]


async def test_the_client_sends_a_ttl_and_reads_deduplication(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    import httpx

    from inferd.client import AsyncClient

    with_dedup(models_dir)
    async with serve(**fast(workers=0)) as s:
        transport = httpx.ASGITransport(app=s.app)
        async with AsyncClient("http://inferd", transport=transport) as client:
            first = await client.submit("streamer", "same", ttl_seconds=60)
            joined = await client.submit("streamer", "same")
    assert first.expires_at is not None and not first.deduplicated
    assert abs((first.expires_at - first.created_at).total_seconds() - 60) < 1  # type: ignore[operator]
    assert joined.deduplicated and joined.deduplicated_from == first.id
    assert joined.expires_at is None
