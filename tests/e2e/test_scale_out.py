"""Scaled out: two API processes and two worker processes sharing PostgreSQL and Redis.

Requests are submitted to both APIs in turn and each is followed over SSE on the *other* API
while it runs, so every chunk crosses processes (worker → PostgreSQL → Redis → API). Each
request must run exactly once (one attempt, one ``running`` and one ``done`` event, one
"job finished" among all the workers' logs) and every chunk must reach its follower once, in
order.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import Server
from tests.e2e.test_reliability import PG_ADMIN, REDIS_URL, Cluster, _frames, _require, record
from tests.support.models import write_streaming_model

REQUESTS = 40
CHUNKS = 4


@pytest.fixture
def pg_cluster(tmp_path: Path, models_dir: Path) -> Iterator[Cluster]:
    import asyncpg
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except redis.RedisError as exc:
        _require("Redis", exc)
    name = f"inferd_scale_{uuid.uuid4().hex[:12]}"

    async def admin(sql: str) -> None:
        conn = await asyncpg.connect(PG_ADMIN, timeout=5)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    try:
        asyncio.run(admin(f'CREATE DATABASE "{name}"'))
    except (OSError, asyncpg.PostgresError) as exc:
        _require("PostgreSQL", exc)
    write_streaming_model(models_dir, chunk_delay_s=0.05, state_dir=str(tmp_path))
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    cluster = Cluster(tmp_path, models_dir, url, REDIS_URL)
    cluster.write_config(models=["streamer"], lease_seconds=5.0, heartbeat_seconds=0.5)
    try:
        yield cluster
    finally:
        cluster.close()
        asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def _submit_and_follow(submit_to: Server, follow_on: Server, text: str) -> dict[str, Any]:
    async with httpx.AsyncClient(timeout=60) as client:
        r = await client.post(
            submit_to.url + "/v1/requests",
            json={"model": "streamer", "input": text, "parameters": {"chunks": CHUNKS}},
        )
        assert r.status_code == 202, r.text
        request_id = r.json()["id"]
        frames: list[dict[str, Any]] = []
        url = f"{follow_on.url}/v1/requests/{request_id}/events"
        async with client.stream("GET", url) as stream:
            lines = [line async for line in stream.aiter_lines()]
        frames = list(_frames(iter(lines)))
        return {"id": request_id, "text": text, "frames": frames}


@pytest.mark.timeout(240)
def test_two_apis_and_two_workers_run_every_request_once(pg_cluster: Cluster) -> None:
    workers = [pg_cluster.worker(concurrency=4) for _ in range(2)]
    apis = [pg_cluster.api(), pg_cluster.api()]

    async def run_all() -> list[dict[str, Any]]:
        return await asyncio.gather(
            *(_submit_and_follow(apis[n % 2], apis[(n + 1) % 2], f"r{n}") for n in range(REQUESTS))
        )

    followed = asyncio.run(run_all())
    assert all(proc.poll() is None for proc in workers)
    for item in followed:
        frames = item["frames"]
        ids = [int(frame["id"]) for frame in frames]
        assert ids == sorted(set(ids)), f"{item['id']}: ids out of order or repeated: {ids}"
        chunks = [f["data"]["response"] for f in frames if f.get("event") == "response"]
        assert chunks == [f"{item['text']}-{i}" for i in range(CHUNKS)], item["id"]
        statuses = [f["data"].get("status") for f in frames if f.get("event") == "status"]
        assert statuses.count("running") == 1, statuses
        assert [f.get("event") for f in frames].count("done") == 1
        assert frames[-1]["event"] == "done"
        rec = record(apis[0], item["id"])
        assert (rec["status"], rec["attempts"]) == ("succeeded", 1)
        assert rec["result"]["text"] == "".join(chunks)
    finished: dict[str, int] = {}
    per_worker = []
    for n in range(len(workers)):
        ran = 0
        for line in (pg_cluster.root / f"worker-{n}.log").read_text().splitlines():
            if '"job finished"' in line:
                entry = json.loads(line)
                assert entry["outcome"] == "succeeded", entry
                finished[entry["request_id"]] = finished.get(entry["request_id"], 0) + 1
                ran += 1
        per_worker.append(ran)
    assert finished == {item["id"]: 1 for item in followed}
    assert all(ran > 0 for ran in per_worker), per_worker  # both workers took a share
    listing = httpx.get(apis[1].url + "/v1/requests", params={"limit": 100}, timeout=10)
    assert len(listing.json()["requests"]) == REQUESTS
