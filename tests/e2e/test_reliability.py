"""Reliability of long-running requests with real processes, on SQLite and on PostgreSQL.

API processes (``inferd serve --workers 0``) and worker processes (``inferd worker``) share
one database and Redis, as they do when scaled out.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.e2e.conftest import INFERD, Server, env
from tests.support.models import write_streaming_model

REDIS_URL = "redis://127.0.0.1:6379/0"
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def _require(what: str, error: BaseException) -> None:
    if os.environ.get("INFERD_TEST_REQUIRE_SERVICES") == "1":
        raise AssertionError(f"{what} is required for this test: {error!r}")
    pytest.skip(f"{what} is not reachable: {error!r}")


@pytest.fixture(params=["sqlite", "postgres"])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite+aiosqlite:///{tmp_path / 'inferd.db'}"
        return
    import asyncpg

    name = f"inferd_rel_{uuid.uuid4().hex[:12]}"

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
    yield f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    asyncio.run(admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture
def redis_url() -> str:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL, socket_timeout=2).ping()
    except redis.RedisError as exc:
        _require("Redis", exc)
    return REDIS_URL


class Cluster:
    """API and worker processes over one database, stopped at the end of the test."""

    def __init__(self, root: Path, models_dir: Path, database_url: str, redis_url: str) -> None:
        self.root = root
        self.config = root / "inferd.toml"
        self.settings: dict[str, Any] = {
            "models_dir": str(models_dir),
            # The streaming model alone: each process starts without loading the demo models
            # (sklearn's import and iris's load were ~1.5 s of every start).
            "models": ["streamer"],
            "database_url": database_url,
            "redis_url": redis_url,
            "workers": 0,
            "lease_seconds": 1.0,
            "heartbeat_seconds": 0.2,
            "poll_seconds": 0.05,
            "max_attempts": 3,
            "retry_base_seconds": 0.05,
            "retry_max_seconds": 0.1,
            "sse_keepalive_seconds": 1.0,
            "gc_freeze": False,
        }
        self.apis: list[Server] = []
        self.workers: list[Any] = []

    def write_config(self, **changes: Any) -> None:
        self.settings.update(changes)
        lines = [f"{k} = {v!r}" if not isinstance(v, bool) else f"{k} = {str(v).lower()}"
                 for k, v in self.settings.items()]  # fmt: skip
        self.config.write_text("\n".join(lines).replace("'", '"') + "\n")

    def api(self) -> Server:
        server = Server(["--config", str(self.config)], self.root)
        self.apis.append(server)
        server.wait_ready()
        return server

    def worker(self, concurrency: int = 1) -> Any:
        import subprocess

        log = (self.root / f"worker-{len(self.workers)}.log").open("wb")
        proc = subprocess.Popen(
            [INFERD, "worker", "--config", str(self.config), "-n", str(concurrency)],
            cwd=self.root,
            env=env(),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.workers.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.workers:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
        for server in self.apis:
            server.stop(signal.SIGKILL)


@pytest.fixture
def cluster(
    tmp_path: Path, models_dir: Path, database_url: str, redis_url: str
) -> Iterator[Cluster]:
    write_streaming_model(models_dir, chunk_delay_s=0.25, state_dir=str(tmp_path))
    c = Cluster(tmp_path, models_dir, database_url, redis_url)
    c.write_config()
    yield c
    c.close()


def submit(api: Server, text: str, chunks: int = 6, key: str | None = None) -> str:
    headers = {"Idempotency-Key": key} if key else {}
    r = httpx.post(
        api.url + "/v1/requests",
        json={"model": "streamer", "input": text, "parameters": {"chunks": chunks}},
        headers=headers,
        timeout=10,
    )
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def record(api: Server, request_id: str) -> dict[str, Any]:
    return dict(httpx.get(f"{api.url}/v1/requests/{request_id}", timeout=10).json())


def wait_for(api: Server, request_id: str, check: Any, within: float = 30.0) -> dict[str, Any]:
    end = time.monotonic() + within
    while True:
        rec = record(api, request_id)
        if check(rec):
            return rec
        if time.monotonic() > end:
            raise AssertionError(f"condition not reached; last record: {rec}")
        time.sleep(0.05)


def terminal(rec: dict[str, Any]) -> bool:
    return rec["status"] in ("succeeded", "failed", "cancelled", "dead")


def events(api: Server, request_id: str, after: int = 0) -> list[dict[str, Any]]:
    from tests.integration.test_requests_api import parse_sse

    headers = {"Last-Event-ID": str(after)} if after else {}
    r = httpx.get(f"{api.url}/v1/requests/{request_id}/events", headers=headers, timeout=30)
    return parse_sse(r.text)


def test_killed_worker_job_completes_once_elsewhere(cluster: Cluster) -> None:
    api = cluster.api()
    first = cluster.worker()
    request_id = submit(api, "kill")
    wait_for(api, request_id, lambda r: r["status"] == "running" and r["responses"])
    first.send_signal(signal.SIGKILL)
    first.wait()
    cluster.worker()
    done = wait_for(api, request_id, terminal)
    assert done["status"] == "succeeded"
    assert done["attempts"] == 2
    assert done["result"]["text"] == "".join(f"kill-{i}" for i in range(6))
    frames = events(api, request_id)
    assert [f["event"] for f in frames].count("done") == 1
    listing = httpx.get(api.url + "/v1/requests").json()["requests"]
    assert [r["id"] for r in listing] == [request_id]


def test_paused_worker_past_its_lease_changes_nothing(cluster: Cluster) -> None:
    api = cluster.api()
    paused = cluster.worker()
    request_id = submit(api, "pause")
    wait_for(api, request_id, lambda r: r["status"] == "running" and r["responses"])
    paused.send_signal(signal.SIGSTOP)
    time.sleep(1.5)  # past the 1 s lease
    cluster.worker()
    done = wait_for(api, request_id, terminal)
    paused.send_signal(signal.SIGCONT)
    time.sleep(1.0)  # the resumed worker tries to go on writing
    after = record(api, request_id)
    assert done["status"] == after["status"] == "succeeded"
    assert after["attempts"] == 2
    assert after["result"] == done["result"]
    assert [r["response"] for r in after["responses"]] == [f"pause-{i}" for i in range(6)]
    frames = events(api, request_id)
    restart = next(
        i for i, f in enumerate(frames)
        if f["event"] == "status" and f["data"].get("status") == "running"
        and f["data"].get("attempt") == 2
    )  # fmt: skip
    late = [f for f in frames[restart:] if f["event"] == "response"]
    assert [f["data"]["response"] for f in late] == [f"pause-{i}" for i in range(6)]
    assert [f["event"] for f in frames].count("done") == 1
    assert [int(f["id"]) for f in frames] == list(range(1, len(frames) + 1))


def test_always_failing_job_goes_dead_without_delaying_others(cluster: Cluster) -> None:
    api = cluster.api()
    cluster.worker(concurrency=2)
    wait_for(api, submit(api, "warm", chunks=1), terminal)  # the worker is up
    doomed = submit(api, "boom")
    started = time.monotonic()
    fine = submit(api, "fine", chunks=2)
    ok = wait_for(api, fine, terminal)
    assert ok["status"] == "succeeded"
    assert time.monotonic() - started < 5
    dead = wait_for(api, doomed, terminal)
    assert dead["status"] == "dead"
    assert dead["attempts"] == 3
    assert "the model exploded" in dead["error"]
    assert events(api, doomed)[-1]["event"] == "error"


def test_job_ten_times_longer_than_its_lease_runs_once(cluster: Cluster) -> None:
    cluster.write_config(lease_seconds=0.5, heartbeat_seconds=0.1)
    api = cluster.api()
    cluster.worker()
    request_id = submit(api, "long", chunks=20)  # 20 x 0.25 s = 5 s, ten leases
    done = wait_for(api, request_id, terminal, within=60)
    assert done["status"] == "succeeded"
    assert done["attempts"] == 1
    assert len(done["responses"]) == 20


def test_hundred_concurrent_posts_with_one_key_give_one_request(cluster: Cluster) -> None:
    api = cluster.api()
    body = {"model": "streamer", "input": "once", "parameters": {"chunks": 1}}

    async def post_all() -> list[httpx.Response]:
        async with httpx.AsyncClient(base_url=api.url, timeout=30) as client:
            return await asyncio.gather(
                *(
                    client.post("/v1/requests", json=body, headers={"Idempotency-Key": "one"})
                    for _ in range(100)
                )
            )

    responses = asyncio.run(post_all())
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["id"] for r in responses}) == 1
    assert len(httpx.get(api.url + "/v1/requests").json()["requests"]) == 1


def test_sse_resume_on_another_api_process_gets_every_chunk_once(cluster: Cluster) -> None:
    first, second = cluster.api(), cluster.api()
    cluster.worker()
    chunks = 10
    request_id = submit(first, "sse", chunks=chunks)
    drop_after = random.randint(1, chunks - 2)
    received: list[str] = []
    last_id = "0"
    with httpx.stream("GET", f"{first.url}/v1/requests/{request_id}/events", timeout=30) as r:
        for frame in _frames(r.iter_lines()):
            last_id = frame.get("id", last_id)
            if frame.get("event") == "response":
                received.append(frame["data"]["response"])
                if len(received) == drop_after:
                    break  # the connection drops here
    headers = {"Last-Event-ID": last_id}
    with httpx.stream(
        "GET", f"{second.url}/v1/requests/{request_id}/events", headers=headers, timeout=30
    ) as r:
        ended = None
        for frame in _frames(r.iter_lines()):
            if frame.get("event") == "response":
                received.append(frame["data"]["response"])
            ended = frame.get("event")
    assert ended == "done"
    assert received == [f"sse-{i}" for i in range(chunks)]


def _frames(lines: Iterator[str]) -> Iterator[dict[str, Any]]:
    import orjson

    frame: dict[str, Any] = {}
    for line in lines:
        if not line:
            if frame:
                yield frame
            frame = {}
        elif line.startswith(":"):
            continue
        else:
            key, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            frame[key] = orjson.loads(value) if key == "data" else value


def test_bad_input_is_refused_clearly(cluster: Cluster) -> None:
    api = cluster.api()
    post = httpx.post
    unknown = post(api.url + "/v1/requests", json={"model": "nope", "input": "x"})
    malformed = post(
        api.url + "/v1/requests", content=b"{", headers={"content-type": "application/json"}
    )
    oversize = post(api.url + "/v1/requests", json={"model": "streamer", "input": "x" * 2_000_000})
    cursor = httpx.get(api.url + "/v1/requests", params={"cursor": "garbage"})
    assert unknown.status_code == 404
    assert "nope" in unknown.json()["error"]["message"]
    assert malformed.status_code == 400
    assert "not valid JSON" in malformed.json()["error"]["message"]
    assert oversize.status_code == 413
    assert cursor.status_code == 400
    assert "cursor" in cursor.json()["error"]["message"]


def test_sigterm_hands_running_jobs_back_without_burning_an_attempt(cluster: Cluster) -> None:
    # A lease long enough that the second worker's run cannot lose it to a stall of the
    # machine (a second attempt this test is not about); expiry has tests of its own.
    cluster.write_config(shutdown_grace_seconds=0.3, lease_seconds=10.0, heartbeat_seconds=0.5)
    api = cluster.api()
    leaving = cluster.worker()
    request_id = submit(api, "term", chunks=12)
    wait_for(api, request_id, lambda r: r["status"] == "running" and r["responses"])
    leaving.send_signal(signal.SIGTERM)
    assert leaving.wait(30) == 0
    handed_back = record(api, request_id)
    assert handed_back["status"] == "queued"
    assert handed_back["attempts"] == 0
    cluster.worker()
    done = wait_for(api, request_id, terminal)
    assert done["status"] == "succeeded"
    assert done["attempts"] == 1
