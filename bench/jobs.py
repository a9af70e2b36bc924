"""Long-running requests at scale: jobs/s, submit latency and chunk-to-client latency.

    python bench/jobs.py [--backends sqlite,postgres] [--workers 1,4] [--concurrency 16]
                         [--jobs 3000] [--rates 200,400] [--duration 20] [--chunks 150]

For each database (a throwaway one), the bench first measures a *baseline*: the least a queue
on that database can do per job, one ``FOR UPDATE SKIP LOCKED`` claim (on SQLite, the same
claim under its write lock) and one update marking it done, from ``--baseline-claimers``
connections, no HTTP, no events; and the *queue alone*: ``--jobs`` queued iris requests run
by one worker of ``--concurrency`` slots in the bench's own process (inferd's claims, model
batcher and fenced writes, no HTTP, no other process). Then, for each worker count, it starts
the real processes:
one API (``inferd serve --workers 0``) and that many worker processes (``inferd worker -n
--concurrency``), sharing the database and Redis (127.0.0.1:6379); a worker count of 0 is the
embedded default instead: one ``inferd serve --workers <concurrency>`` that runs the jobs
itself, with the in-process event bus and no Redis. It measures:

* *drain*: ``--jobs`` iris requests are queued before the workers start; jobs/s between 5 %
  and 95 % of them done (every job: claimed, run through the model's batcher, its chunk and
  ``done`` event stored, followers woken);
* *flow*, at each of ``--rates``: iris requests are submitted through the API at that
  constant rate for ``--duration`` seconds by ``bench/openloop.c`` (compiled here; one thread,
  raw HTTP/1.1, ``--connections`` keep-alive connections, a request's latency counted from
  when it was due, so a stalled server is charged for every request it delayed): jobs done/s
  over the last three quarters of the run, the backlog (queued and running) when the
  submits end, ``POST /v1/requests`` p50/p99, refusals, whether every request ends
  ``succeeded``, and the CPU time per request of the API, the workers and the generator;
* *chunk to client*, during that flow: a model yields a chunk every 20 ms (``--chunks`` of
  them); a separate client process submits it to the first API, follows its SSE stream on the
  last one at once and notes when each chunk arrives against the ``sent_at`` the worker
  stamped just before storing it (same machine, same clock): the database write, the wake-up
  through Redis (which carries the event itself) and the SSE write. Chunks stored before the
  stream opened are replayed from the store, not delivered live: they are counted
  (``replayed``), not timed.

Everything (load generator included) shares the machine's cores: the figures are those of the
whole system on this machine, not of the database alone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket
import sqlite3
import statistics
import struct
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from overload import build_generator  # bench/overload.py: builds bench/openloop.c

ROOT = Path(__file__).resolve().parent.parent
PG_ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"
REDIS_URL = "redis://127.0.0.1:6379/0"
INFERD = str(Path(sys.executable).with_name("inferd"))
IRIS = {"model": "iris", "input": {"features": [5.1, 3.5, 1.4, 0.2]}}

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


def ms(value: float) -> float:
    return round(value * 1000.0, 2)


async def _admin(sql: str) -> None:
    import asyncpg

    conn = await asyncpg.connect(PG_ADMIN, timeout=5)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


def database(backend: str, folder: Path) -> tuple[str, Callable[[], None]]:
    """A fresh, migrated database URL and a function that drops it."""
    from inferd.db.migrate import migrate

    if backend == "sqlite":
        path = folder / f"bench-{uuid.uuid4().hex[:6]}.db"
        url = f"sqlite+aiosqlite:///{path}"
        drop: Callable[[], None] = lambda: None  # noqa: E731 (the folder goes at the end)
    else:
        name = f"inferd_bench_{uuid.uuid4().hex[:10]}"
        asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
        url = f"postgresql+asyncpg://postgres@127.0.0.1:5432/{name}"

        def drop() -> None:
            asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    asyncio.run(migrate(url))
    return url, drop


# --- the baseline: the least a queue on this database does per job ------------------------------


def baseline(backend: str, url: str, jobs: int, claimers: int) -> dict[str, Any]:
    if backend == "sqlite":
        return _baseline_sqlite(url.split("///", 1)[1], jobs)
    return asyncio.run(_baseline_postgres(url.replace("+asyncpg", ""), jobs, claimers))


def _baseline_sqlite(path: str, jobs: int) -> dict[str, Any]:
    # One writer at a time is all SQLite allows: one connection, the pragmas inferd uses.
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE bench_queue (id INTEGER PRIMARY KEY, state TEXT NOT NULL)")
    conn.execute("CREATE INDEX bench_queue_state ON bench_queue (state, id)")
    conn.executemany("INSERT INTO bench_queue (state) VALUES ('queued')", [()] * jobs)
    started, done = time.perf_counter(), 0
    while True:
        conn.execute("BEGIN IMMEDIATE")
        row = conn.execute(
            "UPDATE bench_queue SET state = 'running' WHERE id = (SELECT id FROM bench_queue"
            " WHERE state = 'queued' ORDER BY id LIMIT 1) RETURNING id"
        ).fetchone()
        conn.execute("COMMIT")
        if row is None:
            break
        conn.execute("UPDATE bench_queue SET state = 'done' WHERE id = ?", row)
        done += 1
    elapsed = time.perf_counter() - started
    conn.close()
    return {"claimers": 1, "jobs": done, "jobs_per_s": round(done / elapsed, 1)}


async def _baseline_postgres(dsn: str, jobs: int, claimers: int) -> dict[str, Any]:
    import asyncpg

    pool = await asyncpg.create_pool(dsn, min_size=claimers, max_size=claimers)
    try:
        await pool.execute(
            "CREATE TABLE bench_queue (id bigserial PRIMARY KEY, state text NOT NULL);"
            "CREATE INDEX ON bench_queue (state, id)"
        )
        await pool.execute(
            "INSERT INTO bench_queue (state) SELECT 'queued' FROM generate_series(1, $1)", jobs
        )
        done = 0

        async def claimer() -> None:
            nonlocal done
            async with pool.acquire() as conn:
                claim = await conn.prepare(
                    "UPDATE bench_queue SET state = 'running' WHERE id = (SELECT id FROM"
                    " bench_queue WHERE state = 'queued' ORDER BY id LIMIT 1"
                    " FOR UPDATE SKIP LOCKED) RETURNING id"
                )
                finish = await conn.prepare("UPDATE bench_queue SET state = 'done' WHERE id = $1")
                while (job := await claim.fetchval()) is not None:
                    await finish.fetch(job)
                    done += 1

        started = time.perf_counter()
        await asyncio.gather(*(claimer() for _ in range(claimers)))
        elapsed = time.perf_counter() - started
    finally:
        await pool.close()
    return {"claimers": claimers, "jobs": done, "jobs_per_s": round(done / elapsed, 1)}


# --- the queue alone: store and worker in this process ---------------------------------------


async def queue_only(url: str, models_dir: Path, jobs: int, concurrency: int) -> dict[str, Any]:
    """``jobs`` queued iris requests run by one in-process worker: the queue's own cost (the
    claims, the model's batcher, the fenced writes), without HTTP or other processes."""
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
    store = SqlStore(url)
    try:
        sem = asyncio.Semaphore(32)

        async def create() -> None:
            async with sem:
                await store.create(user="bench", model="iris", input=IRIS["input"], parameters={})

        await asyncio.gather(*(create() for _ in range(jobs)))
        worker = Worker(
            store, InProcessEventBus(), ModelExecutor(registry), concurrency=concurrency
        )
        started = time.perf_counter()
        ran = await worker.run_burst()
        elapsed = time.perf_counter() - started
    finally:
        await registry.stop()
        await store.close()
    return {"jobs": ran, "concurrency": concurrency, "jobs_per_s": round(ran / elapsed, 1)}


# --- the real thing: API and worker processes ----------------------------------------------------


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _source() -> str:
    """The folder inferd is imported from here: the processes run the same code."""
    import inferd

    return str(Path(inferd.__file__).resolve().parents[1])


class Cluster:
    """API processes and worker processes on one database and Redis; or, ``in_process``,
    the embedded default: one ``inferd serve`` whose own workers run the jobs, no Redis."""

    def __init__(
        self, work: Path, models_dir: Path, url: str, concurrency: int, in_process: bool = False
    ) -> None:
        self.work, self.url, self.concurrency = work, url, concurrency
        self.in_process = in_process
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("INFERD_")}
        self.env.update(
            PYTHONPATH=os.pathsep.join([_source(), str(work)]),
            INFERD_DATABASE_URL=url,
            INFERD_MODELS_DIR=str(models_dir),
            INFERD_MODELS="iris,ticker",
            INFERD_ACCESS_LOG="false",
        )
        if not in_process:
            self.env["INFERD_REDIS_URL"] = REDIS_URL
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self.bases: list[str] = []
        self.apis: list[subprocess.Popen[bytes]] = []
        self.workers: list[subprocess.Popen[bytes]] = []

    def _spawn(self, args: list[str], name: str) -> subprocess.Popen[bytes]:
        log = self.work / f"{name}.log"
        self.logs.append(log)
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [INFERD, *args], cwd=self.work, env=self.env, stdout=out, stderr=subprocess.STDOUT
            )
        self.procs.append(proc)
        return proc

    def start_api(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        base = f"http://127.0.0.1:{port}"
        workers = str(self.concurrency if self.in_process else 0)
        api = self._spawn(["serve", "--workers", workers, "--port", str(port)], f"api-{port}")
        self.bases.append(base)
        self.apis.append(api)
        for _ in range(600):
            if api.poll() is not None:
                raise RuntimeError(self.logs[-1].read_text()[-3000:])
            try:
                if httpx.get(base + "/health/ready", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError("the API did not become ready")

    def start_workers(self, count: int) -> None:
        if self.in_process:  # the API's own workers: it starts once the jobs are queued
            self.start_api()
            return
        for n in range(count):
            self.workers.append(self._spawn(["worker", "-n", str(self.concurrency)], f"worker-{n}"))

    def close(self) -> None:
        for proc in self.procs:
            proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def _counts(store: Any) -> dict[str, int]:
    counts: dict[str, int] = await store.counts()
    return counts


async def drain(cluster: Cluster, workers: int, jobs: int) -> dict[str, Any]:
    from inferd.jobs.sql import SqlStore

    store = SqlStore(cluster.url)
    try:
        sem = asyncio.Semaphore(8)

        async def create() -> None:
            async with sem:
                await store.create(user="bench", model="iris", input=IRIS["input"], parameters={})

        await asyncio.gather(*(create() for _ in range(jobs)))
        cluster.start_workers(workers)
        low, high = round(jobs * 0.05), round(jobs * 0.95)
        t_low = t_high = None
        deadline = time.monotonic() + 600
        while t_high is None and time.monotonic() < deadline:
            done = (await _counts(store))["succeeded"]
            now = time.perf_counter()
            if t_low is None and done >= low:
                t_low, n_low = now, done
            if done >= high:
                t_high, n_high = now, done
            await asyncio.sleep(0.05)
        if t_low is None or t_high is None:
            raise RuntimeError("the queue did not drain")
        while (await _counts(store))["succeeded"] < jobs:  # the rest, before the flow starts
            if time.monotonic() > deadline:
                raise RuntimeError("the queue did not drain")
            await asyncio.sleep(0.05)
        return {"jobs": jobs, "jobs_per_s": round((n_high - n_low) / (t_high - t_low), 1)}
    finally:
        await store.close()


def _open_loop(
    generator: Path, base: str, rate: float, seconds: float, connections: int, out: Path
) -> tuple[list[tuple[int, int, int]], float]:
    """Submit iris requests at ``rate`` a second for ``seconds`` (blocking): each answer's
    (due ns, latency ns from when it was due, status), and the generator's CPU seconds."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    cmd = [str(generator), "-a", host, "-p", port, "-u", "/v1/requests"]
    cmd += ["-b", json.dumps(IRIS), "-c", str(connections), "-s", f"{rate:g}:{seconds:g}"]
    cmd += ["-o", str(out), "-w", "30", "-t", "30"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode() if proc.stderr is not None else ""
    if proc.returncode != 0:
        raise RuntimeError(f"openloop failed ({proc.returncode}): {stderr}")
    data = out.read_bytes()
    records = [(due, latency, status) for due, latency, status, _ in _RECORD.iter_unpack(data)]
    return records, usage.ru_utime + usage.ru_stime


_RECORD = struct.Struct("<qqii")  # openloop's record: due ns, latency ns, status, phase


async def flow(
    cluster: Cluster,
    generator: Path,
    rate: float,
    duration: float,
    connections: int,
    chunks: int,
) -> dict[str, Any]:
    """Submits at a constant ``rate`` for ``duration`` seconds (open loop, spread over the
    APIs), with one ticker request followed over SSE meanwhile."""
    from inferd.jobs.sql import SqlStore

    store = SqlStore(cluster.url)
    before = (await _counts(store))["succeeded"]
    out = cluster.work / f"flow-{rate:g}-{time.monotonic_ns()}"

    async def window() -> tuple[float, int, float, int, dict[str, int]]:
        await asyncio.sleep(duration / 4)
        t1, n1 = time.perf_counter(), (await _counts(store))["succeeded"]
        await asyncio.sleep(max(0.0, started + duration - time.perf_counter()))
        counts = await _counts(store)
        return t1, n1, time.perf_counter(), counts["succeeded"], counts

    async def follower() -> dict[str, Any]:
        await asyncio.sleep(duration / 4)
        follow = await asyncio.create_subprocess_exec(
            sys.executable,
            __file__,
            "--follow",
            json.dumps([cluster.bases[0], cluster.bases[-1], chunks]),
            stdout=asyncio.subprocess.PIPE,
        )
        out, _ = await follow.communicate()
        seen: dict[str, Any] = json.loads(out)
        delays: list[float] = seen["live"]
        return {
            "chunks": len(delays),
            "replayed": seen["replayed"],
            "p50_ms": ms(statistics.median(delays)),
            "p99_ms": ms(percentile(delays, 0.99)),
            "max_ms": ms(max(delays)),
        }

    share = rate / len(cluster.bases)
    per_api = max(1, connections // len(cluster.bases))
    cpu_before = {
        "api": sum(_cpu_seconds(p.pid) for p in cluster.apis),
        "workers": sum(_cpu_seconds(p.pid) for p in cluster.workers),
    }
    started = time.perf_counter()
    timing = asyncio.ensure_future(window())
    following = asyncio.ensure_future(follower())
    runs = await asyncio.gather(
        *(
            asyncio.to_thread(
                _open_loop, generator, base, share, duration, per_api, out.with_suffix(f".{n}")
            )
            for n, base in enumerate(cluster.bases)
        )
    )
    cpu_after = {
        "api": sum(_cpu_seconds(p.pid) for p in cluster.apis),
        "workers": sum(_cpu_seconds(p.pid) for p in cluster.workers),
    }
    (t1, n1, t2, n2, at_end), chunk = await timing, await following
    records = [record for records, _ in runs for record in records]
    accepted = [latency / 1e9 for _, latency, status in records if status == 202]
    others: dict[str, int] = {}
    for _, _, status in records:
        if status != 202:
            others[str(status)] = others.get(str(status), 0) + 1
    # Every accepted request must end succeeded (and no other way): wait for the backlog.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        counts = await _counts(store)
        if counts["queued"] == counts["running"] == 0:
            break
        await asyncio.sleep(0.1)
    counts = await _counts(store)
    await store.close()
    submitted = len(accepted)
    return {
        "offered_per_s": rate,
        "seconds": duration,
        "connections": connections,
        "submitted": submitted,
        "not_accepted": others,  # status: count (0: failed or timed out, -1: never sent)
        "jobs_per_s": round((n2 - n1) / (t2 - t1), 1),
        "backlog_at_end": at_end["queued"] + at_end["running"],
        "submit_p50_ms": ms(statistics.median(accepted)) if accepted else None,
        "submit_p99_ms": ms(percentile(accepted, 0.99)) if accepted else None,
        "all_succeeded": counts["succeeded"] - before == submitted + 1
        and sum(counts.values()) == counts["succeeded"],
        "chunk_to_client": chunk,
        # CPU time per accepted request during the flow (all cores): where the time goes.
        "cpu_ms_per_request": {
            **{
                name: round(1000 * (cpu_after[name] - cpu_before[name]) / max(1, submitted), 3)
                for name in cpu_before
            },
            "load_generator": round(1000 * sum(cpu for _, cpu in runs) / max(1, submitted), 3),
        },
    }


def follow(spec: str) -> None:
    """Submit a ticker request to one API and follow its SSE stream on another (the last);
    print the delay of every ``response`` chunk stored after the stream was open (seconds),
    and how many were stored before it (replayed from the store: not live delivery)."""
    submit_to, follow_on, chunks = json.loads(spec)
    live: list[float] = []
    replayed = 0
    with httpx.Client(timeout=120) as client:
        # Both connections are open before the request exists, so the first chunks are live.
        client.get(follow_on + "/health")
        client.get(submit_to + "/health")
        r = client.post(
            submit_to + "/v1/requests",
            json={"model": "ticker", "input": "go", "parameters": {"chunks": chunks}},
        )
        r.raise_for_status()
        with client.stream("GET", follow_on + r.json()["events_url"]) as stream:
            opened = time.time()  # the response head: the API has subscribed and replays
            event = None
            for line in stream.iter_lines():
                if line.startswith("event:"):
                    event = line.split(":", 1)[1].strip()
                elif line.startswith("data:") and event == "response":
                    seen = time.time()
                    sent = datetime.fromisoformat(json.loads(line[5:])["sent_at"]).timestamp()
                    if sent < opened:
                        replayed += 1
                    else:
                        live.append(seen - sent)
                elif line.startswith("data:") and event in ("done", "error"):
                    break
    print(json.dumps({"live": live, "replayed": replayed}))


def run_cluster(
    backend: str,
    tmp: Path,
    models_dir: Path,
    generator: Path,
    workers: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    in_process = workers == 0
    work = tmp / f"{backend}-{args.apis}-{workers}"
    work.mkdir()
    (work / "bench_ticker.py").write_text(TICKER)
    url, drop = database(backend, work)
    cluster = Cluster(work, models_dir, url, args.concurrency, in_process)
    for setting in args.setting:
        name, _, value = setting.partition("=")
        cluster.env["INFERD_" + name.upper()] = value
    try:
        for _ in range(0 if in_process else args.apis):
            cluster.start_api()
        drained = asyncio.run(drain(cluster, workers, args.jobs))
        flowed = [
            asyncio.run(
                flow(cluster, generator, rate, args.duration, args.connections, args.chunks)
            )
            for rate in (float(r) for r in args.rates.split(","))
        ]
    finally:
        cluster.close()
        drop()
    return {
        "apis": 1 if in_process else args.apis,
        "workers": "in-process" if in_process else workers,
        "concurrency": args.concurrency,
        "drain": drained,
        "flow": flowed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default="sqlite,postgres")
    parser.add_argument(
        "--workers",
        default="1,4",
        help="worker processes, comma-separated; 0: the embedded default (one `inferd serve` "
        "running the jobs itself with --concurrency workers, in-process bus, no Redis)",
    )
    parser.add_argument("--concurrency", type=int, default=16, help="slots per worker")
    parser.add_argument("--apis", type=int, default=1, help="API processes")
    parser.add_argument("--jobs", type=int, default=3000, help="jobs of the drain")
    parser.add_argument("--duration", type=float, default=20.0, help="seconds of flow")
    parser.add_argument(
        "--rates", default="200,400", help="submits/s offered by the flows, comma-separated"
    )
    parser.add_argument(
        "--connections", type=int, default=256, help="the load generator's connections"
    )
    parser.add_argument("--chunks", type=int, default=150, help="chunks of the followed job")
    parser.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting of every inferd process (INFERD_<NAME>), e.g. claim_interval_seconds=0.01",
    )
    parser.add_argument("--baseline-jobs", type=int, default=5000)
    parser.add_argument("--baseline-claimers", type=int, default=4)
    parser.add_argument("--skip-baseline", action="store_true", help="no baseline, no queue alone")
    parser.add_argument("--follow", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.follow:
        follow(args.follow)
        return
    from inferd.logs import configure_logging
    from inferd.models.demo import train_demo

    configure_logging("warning", "json")  # the in-process worker logs every job otherwise

    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="inferd-bench-jobs-") as tmp_name:
        tmp = Path(tmp_name)
        models_dir = tmp / "models"
        train_demo(models_dir)
        generator = build_generator(tmp)
        (models_dir / "ticker" / "1").mkdir(parents=True)
        (models_dir / "ticker" / "model.toml").write_text(
            'runtime = "python"\nclass = "bench_ticker:Ticker"\ntask = "text-generation"\n'
            '[input]\ntype = "text"\n'
        )
        for backend in args.backends.split(","):
            base: dict[str, Any] = {"jobs_per_s": None}
            alone: dict[str, Any] = {"jobs_per_s": None}
            if not args.skip_baseline:
                url, drop = database(backend, tmp)
                try:
                    base = baseline(backend, url, args.baseline_jobs, args.baseline_claimers)
                finally:
                    drop()
                print(f"{backend} baseline: {json.dumps(base)}", flush=True)
                url, drop = database(backend, tmp)
                try:
                    alone = asyncio.run(queue_only(url, models_dir, args.jobs, args.concurrency))
                finally:
                    drop()
                alone["x_baseline"] = round(alone["jobs_per_s"] / base["jobs_per_s"], 3)
                print(f"{backend} queue alone: {json.dumps(alone)}", flush=True)
            runs = []
            for workers in (int(n) for n in args.workers.split(",")):
                run = run_cluster(backend, tmp, models_dir, generator, workers, args)
                if base["jobs_per_s"]:
                    run["drain"]["x_baseline"] = round(
                        run["drain"]["jobs_per_s"] / base["jobs_per_s"], 3
                    )
                print(f"{backend} {run['workers']} worker(s): {json.dumps(run)}", flush=True)
                runs.append(run)
            results[backend] = {"baseline": base, "queue_alone": alone, "runs": runs}
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
