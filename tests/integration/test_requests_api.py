"""Long-running requests through the whole app in-process: submit, follow, list, cancel."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from tests.support.models import write_streaming_model


def parse_sse(text: str) -> list[dict[str, Any]]:
    """Frames of an event stream, as dicts of their fields (data decoded)."""
    frames = []
    for block in text.split("\n\n"):
        fields: dict[str, Any] = {}
        data: list[str] = []
        for line in block.splitlines():
            if line.startswith(":") or not line:
                continue
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if key == "data":
                data.append(value)
            else:
                fields[key] = value
        if data:
            fields["data"] = orjson.loads("\n".join(data))
        if fields:
            frames.append(fields)
    return frames


async def wait_terminal(client: Any, request_id: str, within: float = 10.0) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    end = loop.time() + within
    while True:
        record = (await client.get(f"/v1/requests/{request_id}")).json()
        if record["status"] in ("succeeded", "failed", "cancelled", "dead", "expired"):
            return record
        if loop.time() > end:
            raise AssertionError(f"request still {record['status']} after {within}s")
        await asyncio.sleep(0.02)


def fast(**extra: Any) -> dict[str, Any]:
    base = {"workers": 2, "poll_seconds": 0.05, "heartbeat_seconds": 0.1, "lease_seconds": 2.0}
    base.update(extra)
    return base


async def test_submit_stream_and_read_back(serve: Callable[..., Any], models_dir: Path) -> None:
    write_streaming_model(models_dir, chunk_delay_s=0.01)
    async with serve(**fast()) as s:
        r = await s.client.post(
            "/v1/requests", json={"model": "streamer", "input": "hi", "parameters": {"chunks": 4}}
        )
        assert r.status_code == 202, r.text
        accepted = r.json()
        assert set(accepted) == {
            "id",
            "status",
            "created_at",
            "events_url",
            "expires_at",
            "deduplicated",
            "deduplicated_from",
        }
        assert accepted["deduplicated"] is False and accepted["expires_at"] is None
        assert accepted["status"] == "queued"
        events = await s.client.get(accepted["events_url"])
        record = await wait_terminal(s.client, accepted["id"])
    assert events.headers["content-type"].startswith("text/event-stream")
    frames = parse_sse(events.text)
    responses = [f["data"]["response"] for f in frames if f.get("event") == "response"]
    assert responses == ["hi-0", "hi-1", "hi-2", "hi-3"]
    assert frames[-1]["event"] == "done"
    assert [int(f["id"]) for f in frames] == list(range(1, len(frames) + 1))
    assert "retry" in frames[0]
    assert record["status"] == "succeeded"
    assert record["attempts"] == 1
    assert [x["response"] for x in record["responses"]] == responses
    assert all("sent_at" in x for x in record["responses"])
    assert record["result"]["text"] == "hi-0hi-1hi-2hi-3"
    assert record["input"] == "hi"


async def test_tabular_model_gives_one_chunk(serve: Callable[..., Any]) -> None:
    async with serve(**fast()) as s:
        r = await s.client.post(
            "/v1/requests", json={"model": "iris", "input": {"features": [5.1, 3.5, 1.4, 0.2]}}
        )
        record = await wait_terminal(s.client, r.json()["id"])
    assert record["status"] == "succeeded"
    assert len(record["responses"]) == 1
    assert record["result"]["predictions"][0]["label"] == "setosa"


async def test_resume_with_last_event_id(serve: Callable[..., Any], models_dir: Path) -> None:
    write_streaming_model(models_dir)
    async with serve(**fast()) as s:
        r = await s.client.post(
            "/v1/requests", json={"model": "streamer", "input": "x", "parameters": {"chunks": 5}}
        )
        request_id = r.json()["id"]
        await wait_terminal(s.client, request_id)
        whole = parse_sse((await s.client.get(f"/v1/requests/{request_id}/events")).text)
        tail = parse_sse(
            (
                await s.client.get(
                    f"/v1/requests/{request_id}/events", headers={"Last-Event-ID": "3"}
                )
            ).text
        )
        bad = await s.client.get(
            f"/v1/requests/{request_id}/events", headers={"Last-Event-ID": "abc"}
        )
    assert [f["id"] for f in tail] == [f["id"] for f in whole if int(f["id"]) > 3]
    assert bad.status_code == 400


async def test_the_submit_is_answered_in_front_of_the_framework_as_the_route_would(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    write_streaming_model(models_dir)
    body = {"model": "streamer", "input": "same"}
    key = {"Idempotency-Key": "k1"}
    async with serve(**fast()) as s:
        hot = s.app.hot
        assert hot.match({"method": "POST", "path": "/v1/requests"}) is hot.submit
        lean = await s.client.post("/v1/requests", json=body, headers=key)
        lean_bad = await s.client.post(
            "/v1/requests", content=b"{", headers={"content-type": "text/plain"}
        )
        hot.submit = None  # the documented FastAPI route alone
        framework = await s.client.post("/v1/requests", json=body, headers=key)
        framework_bad = await s.client.post(
            "/v1/requests", content=b"{", headers={"content-type": "text/plain"}
        )
        metrics = (await s.client.get("/metrics")).text
    assert lean.status_code == framework.status_code == 202
    assert framework.json()["id"] == lean.json()["id"]
    assert framework.headers["idempotent-replayed"] == "true"
    assert (
        lean.headers["location"]
        == framework.headers["location"]
        == (f"/v1/requests/{lean.json()['id']}")
    )
    assert set(lean.json()) == set(framework.json())
    assert lean_bad.status_code == framework_bad.status_code == 415
    assert lean_bad.json() == framework_bad.json()
    assert 'inference_requests_total{endpoint="/v1/requests",method="POST",status="202"} 2.0' in (
        metrics
    )


async def test_idempotency_key(serve: Callable[..., Any], models_dir: Path) -> None:
    write_streaming_model(models_dir)
    body = {"model": "streamer", "input": "same"}
    async with serve(**fast()) as s:
        first = await s.client.post("/v1/requests", json=body, headers={"Idempotency-Key": "k1"})
        again = await s.client.post("/v1/requests", json=body, headers={"Idempotency-Key": "k1"})
        other = await s.client.post(
            "/v1/requests",
            json={**body, "input": "different"},
            headers={"Idempotency-Key": "k1"},
        )
        many = await asyncio.gather(
            *(
                s.client.post("/v1/requests", json=body, headers={"Idempotency-Key": "k2"})
                for _ in range(100)
            )
        )
    assert first.json()["id"] == again.json()["id"]
    assert again.headers.get("idempotent-replayed") == "true"
    assert other.status_code == 409
    assert other.json()["error"]["code"] == "idempotency_conflict"
    assert {r.status_code for r in many} == {202}
    assert len({r.json()["id"] for r in many}) == 1


async def test_listing_pages_newest_first(serve: Callable[..., Any], models_dir: Path) -> None:
    write_streaming_model(models_dir)
    async with serve(**fast(workers=0)) as s:
        ids = []
        for i in range(7):
            r = await s.client.post("/v1/requests", json={"model": "streamer", "input": f"n{i}"})
            ids.append(r.json()["id"])
        seen: list[str] = []
        cursor = None
        while True:
            params: dict[str, Any] = {"limit": 3}
            if cursor:
                params["cursor"] = cursor
            page = (await s.client.get("/v1/requests", params=params)).json()
            seen.extend(r["id"] for r in page["requests"])
            cursor = page["next_cursor"]
            if not cursor:
                break
        bad_cursor = await s.client.get("/v1/requests", params={"cursor": "not-a-cursor"})
        bad_limit = await s.client.get("/v1/requests", params={"limit": 1000})
    assert seen == list(reversed(ids))
    assert bad_cursor.status_code == 400
    assert bad_limit.status_code == 400


async def test_cancel_queued_and_running(serve: Callable[..., Any], models_dir: Path) -> None:
    write_streaming_model(models_dir, chunk_delay_s=0.2)
    async with serve(**fast(workers=1)) as s:
        running = (
            await s.client.post(
                "/v1/requests",
                json={"model": "streamer", "input": "long", "parameters": {"chunks": 50}},
            )
        ).json()["id"]
        queued = (
            await s.client.post("/v1/requests", json={"model": "streamer", "input": "next"})
        ).json()["id"]
        for _ in range(200):
            if (await s.client.get(f"/v1/requests/{running}")).json()["status"] == "running":
                break
            await asyncio.sleep(0.02)
        cancel_queued = await s.client.post(f"/v1/requests/{queued}/cancel")
        loop = asyncio.get_running_loop()
        asked = loop.time()
        await s.client.post(f"/v1/requests/{running}/cancel")
        stopped = await wait_terminal(s.client, running)
        took = loop.time() - asked
        never = await wait_terminal(s.client, queued)
        frames = parse_sse((await s.client.get(f"/v1/requests/{running}/events")).text)
    assert cancel_queued.status_code == 202
    assert never["status"] == "cancelled"
    assert never["attempts"] == 0
    assert stopped["status"] == "cancelled"
    assert len(stopped["responses"]) < 50
    assert took < 2.0
    assert frames[-1]["event"] == "error"
    assert frames[-1]["data"]["status"] == "cancelled"


async def test_failures_retry_then_dead(
    serve: Callable[..., Any], models_dir: Path, tmp_path: Path
) -> None:
    write_streaming_model(models_dir, state_dir=str(tmp_path))
    settings = fast(max_attempts=3, retry_base_seconds=0.01, retry_max_seconds=0.02)
    async with serve(**settings) as s:
        flaky = (
            await s.client.post("/v1/requests", json={"model": "streamer", "input": "flaky:2"})
        ).json()["id"]
        boom = (
            await s.client.post("/v1/requests", json={"model": "streamer", "input": "boom"})
        ).json()["id"]
        recovered = await wait_terminal(s.client, flaky)
        dead = await wait_terminal(s.client, boom)
    assert recovered["status"] == "succeeded"
    assert recovered["attempts"] == 3
    assert dead["status"] == "dead"
    assert dead["attempts"] == 3
    assert "the model exploded" in dead["error"]


async def test_bad_input(serve: Callable[..., Any], models_dir: Path) -> None:
    write_streaming_model(models_dir)
    async with serve(**fast(workers=0, max_body_bytes=2048)) as s:
        post = s.client.post
        unknown = await post("/v1/requests", json={"model": "nope", "input": "x"})
        malformed = await post(
            "/v1/requests", content=b"{", headers={"content-type": "application/json"}
        )
        oversize = await post("/v1/requests", json={"model": "streamer", "input": "x" * 5000})
        wrong_input = await post("/v1/requests", json={"model": "iris", "input": {"features": [1]}})
        wrong_params = await post(
            "/v1/requests", json={"model": "streamer", "input": "x", "parameters": {"k": 1}}
        )
        missing = await post("/v1/requests", json={"model": "streamer"})
        not_json = await post("/v1/requests", content=b"x", headers={"content-type": "text/plain"})
        no_such = await s.client.get("/v1/requests/req_doesnotexist")
        no_such_events = await s.client.get("/v1/requests/req_doesnotexist/events")
    assert unknown.status_code == 404
    assert "nope" in unknown.json()["error"]["message"]
    assert malformed.status_code == 400
    assert oversize.status_code == 413
    assert wrong_input.status_code == 422
    assert "expects 4" in wrong_input.json()["error"]["message"]
    assert wrong_params.status_code == 422
    assert missing.status_code == 422
    assert not_json.status_code == 415
    assert no_such.status_code == 404
    assert no_such_events.status_code == 404


async def test_text_generation_streams_token_by_token(
    serve: Callable[..., Any], models_dir: Path, tmp_path_factory: Any, monkeypatch: Any
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    from tests.support.textgen import build_tiny_model, write_text_model

    source = build_tiny_model(tmp_path_factory.mktemp("tiny-gpt2"))
    write_text_model(models_dir, "tiny", source=source)
    async with serve(**fast()) as s:
        meta = (await s.client.get("/v1/models/tiny")).json()
        sync = await s.client.post("/v1/models/tiny/predict", json={"features": [1]})
        r = await s.client.post(
            "/v1/requests",
            json={"model": "tiny", "input": "the quick", "parameters": {"max_new_tokens": 8}},
        )
        request_id = r.json()["id"]
        frames = parse_sse((await s.client.get(f"/v1/requests/{request_id}/events")).text)
        record = await wait_terminal(s.client, request_id)
        bad = await s.client.post(
            "/v1/requests",
            json={"model": "tiny", "input": "x", "parameters": {"max_new_tokens": 10**6}},
        )
    assert meta["ready"] is True
    assert meta["endpoint"] == "/v1/requests"
    assert sync.status_code == 422
    assert "POST /v1/requests" in sync.json()["error"]["message"]
    pieces = [f["data"]["response"] for f in frames if f.get("event") == "response"]
    assert len(pieces) > 1
    assert record["status"] == "succeeded"
    assert record["result"]["text"] == "".join(pieces)
    assert frames[-1]["event"] == "done"
    assert bad.status_code == 422
