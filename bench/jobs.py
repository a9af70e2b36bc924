"""Long-running requests: job throughput and chunk-to-client latency, on SQLite and PostgreSQL.

    python bench/jobs.py [--jobs 400] [--concurrency 4] [--chunks 200] [--backends sqlite,postgres]

1. Throughput, for the iris model, with one worker of ``--concurrency`` slots: *drain* is
   ``--jobs`` queued requests run to completion (stored, with their ``done`` event); *flow* is
   ``--jobs`` requests submitted one after the other while the worker runs, timed from the first
   submit to the last completion.
2. Latency: a real ``inferd serve`` streams ``--chunks`` chunks from a model that yields one every
   20 ms; an SSE client notes when each chunk arrives. The worker stamps ``sent_at`` just before
   storing a chunk, so the figure covers the database write, the wake-up and the SSE read.

PostgreSQL runs use a throwaway database on 127.0.0.1:5432 (user postgres); Redis is not needed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
INFERD = str(Path(sys.executable).with_name("inferd"))

TICKER = textwrap.dedent(
    '''
    import time


    class Ticker:
        """Streams "tick-<i>" every 20 ms."""

        can_stream = True

        def __init__(self, spec, version, path):
            self.spec = spec

        def load(self):
            pass

        def predict(self, batch):
            raise ValueError("streaming only")

        def classes(self):
            return None

        def stream(self, input, parameters, should_stop):
            for i in range(int(parameters.get("chunks", 10))):
                if should_stop():
                    return
                time.sleep(0.02)
                yield f"tick-{i}"
    '''
)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def database(backend: str, folder: Path) -> tuple[str, Any]:
    """A fresh database URL and a function that drops it."""
    if backend == "sqlite":
        return f"sqlite+aiosqlite:///{folder / 'bench.db'}", lambda: None
    name = f"inferd_bench_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"
    return url, lambda: asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


async def throughput(url: str, models_dir: Path, jobs: int, concurrency: int) -> dict[str, Any]:
    from inferd.db.migrate import migrate
    from inferd.jobs.events import InProcessEventBus
    from inferd.jobs.runner import ModelExecutor
    from inferd.jobs.sql import SqlStore
    from inferd.jobs.worker import Worker
    from inferd.metrics import Metrics
    from inferd.models.registry import ModelRegistry
    from inferd.settings import Settings

    settings = Settings(_env_file=None, models_dir=models_dir, models=["iris"], gc_freeze=False)
    registry = ModelRegistry(settings, Metrics())
    await registry.load_all()
    await migrate(url)
    store = SqlStore(url)
    worker = Worker(
        store,
        InProcessEventBus(),
        ModelExecutor(registry),
        concurrency=concurrency,
        poll_seconds=0.01,
    )
    body = {"features": [5.1, 3.5, 1.4, 0.2]}
    # Drain: the queue is full before the worker starts.
    for _ in range(jobs):
        await store.create(user="bench", model="iris", input=body, parameters={})
    drain_started = time.perf_counter()
    await worker.run_burst()
    drain = time.perf_counter() - drain_started
    # Flow: jobs are submitted while the worker runs, one after the other.
    runner = asyncio.create_task(worker.run())
    started = time.perf_counter()
    for _ in range(jobs):
        await store.create(user="bench", model="iris", input=body, parameters={})
        worker.wake()
    submitted = time.perf_counter() - started
    while (await store.counts())["succeeded"] < 2 * jobs:  # noqa: ASYNC110 (the database is the truth)
        await asyncio.sleep(0.01)
    elapsed = time.perf_counter() - started
    await worker.stop(grace=5)
    runner.cancel()
    await asyncio.gather(runner, return_exceptions=True)
    await registry.stop()
    await store.close()
    return {
        "jobs": jobs,
        "concurrency": concurrency,
        "drain_jobs_per_s": round(jobs / drain, 1),
        "flow_jobs_per_s": round(jobs / elapsed, 1),
        "flow_submit_per_s": round(jobs / submitted, 1),
    }


def latency(url: str, models_dir: Path, work: Path, chunks: int) -> dict[str, Any]:
    (work / "bench_ticker.py").write_text(TICKER)
    ticker = models_dir / "ticker"
    (ticker / "1").mkdir(parents=True, exist_ok=True)
    (ticker / "model.toml").write_text(
        'runtime = "python"\nclass = "bench_ticker:Ticker"\ntask = "text-generation"\n'
        '[input]\ntype = "text"\n'
    )
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERD_")}
    env.update(
        PYTHONPATH=str(work),
        INFERD_DATABASE_URL=url,
        INFERD_WORKERS="1",
        INFERD_POLL_SECONDS="0.01",
        INFERD_ACCESS_LOG="false",
    )
    log = (work / "serve.log").open("wb")
    server = subprocess.Popen(
        [INFERD, "serve", "--models-dir", str(models_dir), "--port", str(port)],
        cwd=work,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            if server.poll() is not None:
                raise RuntimeError((work / "serve.log").read_text()[-3000:])
            try:
                if httpx.get(base + "/health/ready", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        r = httpx.post(
            base + "/v1/requests",
            json={"model": "ticker", "input": "go", "parameters": {"chunks": chunks}},
        )
        events_url = base + r.json()["events_url"]
        delays: list[float] = []
        with httpx.stream("GET", events_url, timeout=120) as stream:
            event = None
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event == "response":
                    seen = time.time()
                    data = json.loads(line.split(":", 1)[1])
                    sent = datetime.fromisoformat(data["sent_at"]).timestamp()
                    delays.append((seen - sent) * 1000.0)
                elif line.startswith("data:") and event in ("done", "error"):
                    break
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        log.close()
    return {
        "chunks": len(delays),
        "p50_ms": round(statistics.median(delays), 2),
        "p99_ms": round(percentile(delays, 0.99), 2),
        "max_ms": round(max(delays), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=400)
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--chunks", type=int, default=200)
    parser.add_argument("--backends", default="sqlite,postgres")
    args = parser.parse_args()
    from inferd.logs import configure_logging
    from inferd.models.demo import train_demo

    configure_logging("warning", "json")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="inferd-bench-jobs-") as tmp:
        models_dir = Path(tmp) / "models"
        train_demo(models_dir)
        for backend in args.backends.split(","):
            work = Path(tmp) / backend
            work.mkdir()
            url, drop = database(backend, work)
            try:
                tput = asyncio.run(throughput(url, models_dir, args.jobs, args.concurrency))
            finally:
                drop()
            url, drop = database(backend, work)
            try:
                lat = latency(url, models_dir, work, args.chunks)
            finally:
                drop()
            results[backend] = {"throughput": tput, "chunk_to_client": lat}
            print(f"{backend}: {json.dumps(results[backend])}", flush=True)
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
