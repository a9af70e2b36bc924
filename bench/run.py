"""Load-test inferd and two baselines with wrk; write a JSON and a Markdown report.

    python bench/run.py [--targets inferd,raw-asgi,naive-fastapi] [--connections 1,50,256]
                        [--duration 10] [--warmup 2] [--rounds 1] [--models-dir DIR] [--out DIR]
                        [--no-pin]

``--targets inferd-v1,inferd-v2,inferd-v2-binary`` sets the protocols against each other on
one server build: ``POST /v1/models/iris/predict``, the Open Inference Protocol's
``POST /v2/models/iris/infer`` with a JSON tensor, and the same with a binary tensor (Triton's
binary extension); the report gives V2's req/s as a share of /v1's.
``--targets inferd,inferd-nodrift`` sets inferd against itself with drift monitoring off
(``INFERD_DRIFT_ENABLED=false``); ``inferd-tracing`` is inferd with tracing on, exporting
OTLP/HTTP to a sink on loopback (bench/baselines/otlp_sink.py, on wrk's CPU); ``--rounds N``
runs the targets N times in turn.
``--targets inferd,inferd-cache`` sets inferd against itself with the result cache on
(``[cache]`` in the model.toml of the model served, iris or ``--model``): every request of the
load is the same row, so all but the first are hits. ``inferd-shadow``: the served model gets a
version 2 (a copy of 1) that shadows every request (``[shadow] share = 1.0``).
``--baseline-src DIR`` adds the target ``inferd-baseline``: inferd served from another checkout
(``git worktree add DIR <commit>``), with this venv's packages, to compare two commits in one
run.

Each server runs alone on one CPU and wrk (one thread, closed loop) on another; everything is on
127.0.0.1. bench/README.md explains the targets and how to read the report.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent  # the venv's bin: python, inferd
BODY = '{"features": [5.1, 3.5, 1.4, 0.2]}'
TARGETS = (
    "inferd",
    "raw-asgi",
    "naive-fastapi",
    "inferd-nodrift",
    "inferd-tracing",
    "inferd-baseline",
    "inferd-v1",
    "inferd-v2",
    "inferd-v2-binary",
    "inferd-cache",
    "inferd-shadow",
)
PROTOCOLS = ("inferd-v2", "inferd-v2-binary")  # compared with inferd-v1
DEFAULT_TARGETS = ("inferd", "raw-asgi", "naive-fastapi")
BASELINES = ("raw-asgi", "naive-fastapi")
READY_TIMEOUT_S, STOP_TIMEOUT_S, WRK_SLACK_S = 90.0, 15.0, 30
UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}
TICK_S = 1 / os.sysconf("SC_CLK_TCK")
SOCKET_ERRORS = r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)"

LUA = f"""wrk.method = "POST"
wrk.body = '{BODY}'
wrk.headers["Content-Type"] = "application/json"
"""
_ROW = [5.1, 3.5, 1.4, 0.2]
_V2_JSON = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64", "data": _ROW}]}
)
_V2_HEADER = json.dumps(
    {
        "inputs": [
            {
                "name": "input",
                "shape": [1, 4],
                "datatype": "FP64",
                "parameters": {"binary_data_size": 32},
            }
        ],
        "parameters": {"binary_data_output": True},
    }
)
_V2_RAW = "".join(f"\\{b:03d}" for b in struct.pack("<4d", *_ROW))  # Lua's decimal escapes


def _lua(path: str, body: str, headers: dict[str, str]) -> str:
    lines = ['wrk.method = "POST"', f'wrk.path = "{path}"', f"wrk.body = {body}"]
    lines += [f'wrk.headers["{k}"] = "{v}"' for k, v in headers.items()]
    return "\n".join(lines) + "\n"


REQUESTS = {  # the targets that do not post BODY to /predict: their wrk script
    "inferd-v1": _lua("/v1/models/iris/predict", f"'{BODY}'", {"Content-Type": "application/json"}),
    "inferd-v2": _lua(
        "/v2/models/iris/infer", f"'{_V2_JSON}'", {"Content-Type": "application/json"}
    ),
    "inferd-v2-binary": _lua(
        "/v2/models/iris/infer",
        f"'{_V2_HEADER}' .. \"{_V2_RAW}\"",
        {
            "Content-Type": "application/octet-stream",
            "Inference-Header-Content-Length": str(len(_V2_HEADER)),
        },
    ),
}
# Counts responses by status (wrk itself only counts "Non-2xx or 3xx responses").
LUA_TALLY = """local threads = {}
function setup(thread) table.insert(threads, thread) end
statuses = {}
function response(status, headers, body) statuses[status] = (statuses[status] or 0) + 1 end
function done(summary, latency, requests)
  for _, t in ipairs(threads) do
    for code, n in pairs(t:get("statuses")) do io.write(("status %d %d\\n"):format(code, n)) end
  end
end
"""


@dataclass
class Run:
    target: str
    connections: int
    requests: int
    rps: float
    p50_ms: float
    p75_ms: float
    p90_ms: float
    p99_ms: float
    non_2xx: int
    socket_errors: dict[str, int]
    statuses: dict[str, int]  # wrk's per-status tally; empty with --no-tally
    rss_mib: float = 0.0
    server_cpu_pct: float = 0.0  # 100 = one core
    wrk_cpu_pct: float = 0.0
    server: dict[str, int] = field(default_factory=dict)  # inferd's /metrics, deltas over the run
    round: int = 1
    monitor_us: float | None = None  # drift monitor's time per request (its own clock)


@dataclass
class Options:
    targets: list[str]
    connections: list[int]
    duration: int
    warmup: int
    models_dir: Path | None
    out: Path
    rounds: int
    cpus: tuple[int, int] | None  # (server, wrk), None when not pinned
    tally: bool
    model: str | None = None  # what inferd's POST /predict serves (INFERD_DEFAULT_MODEL)
    baseline_src: Path | None = None  # the checkout inferd-baseline is served from


# --------------------------------------------------------------------------- processes


def pinned(cpu: int | None, cmd: list[str]) -> list[str]:
    # taskset execs the command, so the pid of the Popen is the pid of the command itself.
    return cmd if cpu is None else ["taskset", "-c", str(cpu), *cmd]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def http(port: int, path: str, body: str | None = None) -> tuple[int, bytes]:
    data = None if body is None else body.encode()
    headers = {"Content-Type": "application/json"}
    try:
        request = urllib.request.Request(f"http://{HOST}:{port}{path}", data, headers)
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""
    except OSError:
        return 0, b""


def server_command(
    target: str,
    port: int,
    models_dir: Path,
    baseline_src: Path | None = None,
    otlp: str | None = None,
) -> tuple[list[str], dict[str, str]]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERD_")}
    listen = ["--host", HOST, "--port", str(port)]
    if target.startswith("inferd"):  # the defaults: JSON access log on, metrics on
        env["INFERD_ACCESS_LOG"] = "true"
        # A database of its own: another checkout's migrations may be older than this one's.
        env["INFERD_DATA_DIR"] = f".inferd-{target}"
        if target == "inferd-nodrift":  # the same, with drift monitoring off
            env["INFERD_DRIFT_ENABLED"] = "false"
        if target == "inferd-tracing":  # the same, with tracing on (docs/tracing.md)
            if otlp is None:
                raise ValueError("the inferd-tracing target needs an OTLP endpoint")
            env["INFERD_OTEL_ENDPOINT"] = otlp
        cmd = [str(BIN / "inferd"), "serve", *listen, "--models-dir", str(models_dir)]
        if target == "inferd-baseline":  # the other checkout's package before this one's
            if baseline_src is None:
                raise ValueError("the inferd-baseline target needs --baseline-src")
            env["PYTHONPATH"] = str(baseline_src.resolve() / "src")
            cmd = [
                sys.executable,
                "-m",
                "inferd",
                "serve",
                *listen,
                "--models-dir",
                str(models_dir),
            ]
        return [*cmd, "--log-format", "json", "--log-level", "info"], env
    env["BENCH_MODEL_PATH"] = str(models_dir / "iris" / "1" / "model.joblib")
    app = "bench.baselines." + target.replace("-", "_") + ":app"
    cmd = [sys.executable, "-m", "uvicorn", app, "--app-dir", str(ROOT), *listen]
    if target == "raw-asgi":  # the floor logs nothing; the naive service keeps uvicorn's default
        cmd += ["--no-access-log", "--log-level", "warning"]
    return cmd, env


def answers(target: str, port: int) -> bool:
    if target.startswith("inferd"):
        return http(port, "/health/ready")[0] == 200
    return http(port, "/predict", BODY)[0] == 200


@contextlib.contextmanager
def server(target: str, models_dir: Path, opts: Options) -> Iterator[tuple[int, int]]:
    """Start a target, wait until it answers, yield (pid, port); stop it on the way out."""
    port = free_port()
    if target in ("inferd-cache", "inferd-shadow"):  # a copy of the repository, changed
        changed = opts.out / f"models-{target}"
        shutil.rmtree(changed, ignore_errors=True)
        shutil.copytree(models_dir, changed)
        folder = changed / (opts.model or "iris")
        toml = folder / "model.toml"
        if target == "inferd-cache":  # the served model keeps its answers
            extra = "\n[cache]\nmax_entries = 1000\nttl_seconds = 3600\n"
        else:  # version 2, a copy of 1, gets a copy of every request
            shutil.copytree(folder / "1", folder / "2")
            extra = (
                '\n[versions]\npolicy = "specific"\nversions = [1, 2]\ndefault = 1\n'
                "\n[shadow]\nversion = 2\nshare = 1.0\n"
            )
        toml.write_text(toml.read_text() + extra)
        models_dir = changed
    with contextlib.ExitStack() as stack:
        otlp = stack.enter_context(otlp_sink(opts)) if target == "inferd-tracing" else None
        cmd, env = server_command(target, port, models_dir, opts.baseline_src, otlp)
        if opts.model and target.startswith("inferd"):
            env["INFERD_DEFAULT_MODEL"] = opts.model
        cmd = pinned(opts.cpus[0] if opts.cpus else None, cmd)
        yield from _serve(target, port, cmd, env, opts)


@contextlib.contextmanager
def otlp_sink(opts: Options) -> Iterator[str]:
    """An OTLP/HTTP endpoint that discards what it is sent, on wrk's CPU; yields its URL."""
    port = free_port()
    script = ROOT / "bench" / "baselines" / "otlp_sink.py"
    cmd = pinned(opts.cpus[1] if opts.cpus else None, [sys.executable, str(script), str(port)])
    proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + READY_TIMEOUT_S
        while http(port, "/stats")[0] != 200:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the OTLP sink did not come up")
            time.sleep(0.05)
        yield f"http://{HOST}:{port}"
    finally:
        proc.terminate()
        proc.wait(STOP_TIMEOUT_S)


def _serve(
    target: str, port: int, cmd: list[str], env: dict[str, str], opts: Options
) -> Iterator[tuple[int, int]]:
    log_path = opts.out / f"{target}.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=opts.out,
            env=env,
            start_new_session=True,
        )
        try:
            deadline = time.monotonic() + READY_TIMEOUT_S
            while not answers(target, port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    tail = log_path.read_text(errors="replace")[-2000:]
                    raise RuntimeError(f"{target} did not come up; end of {log_path}:\n{tail}")
                time.sleep(0.1)
            yield proc.pid, port
        finally:
            proc.terminate()
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(STOP_TIMEOUT_S)


def rss_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    found = re.search(r"^VmRSS:\s+(\d+) kB", status, re.M)
    return int(found.group(1)) / 1024 if found else 0.0


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) * TICK_S  # utime + stime, all threads


def monitor_seconds(port: int) -> float | None:
    """Time the drift monitor has spent binning and exporting so far (None when it is off)."""
    status, body = http(port, "/v1/models/iris/drift")
    if status != 200:
        return None
    value = json.loads(body).get("update_seconds_total")
    return float(value) if value is not None else None


def server_counters(port: int) -> dict[str, int]:
    """inferd's /predict responses by status, its timeouts and queue rejections (/metrics)."""
    counts: dict[str, int] = {}
    for line in http(port, "/metrics")[1].decode().splitlines():
        name, _, rest = line.partition("{")
        labels, _, value = rest.rpartition("} ")
        status = re.search(r'status="(\d+)"', labels)
        if name == "inference_requests_total" and 'endpoint="/predict"' in labels and status:
            key = "status_" + status.group(1)
        elif name in ("inference_request_timeouts_total", "inference_queue_rejections_total"):
            key = name.removeprefix("inference_").removesuffix("_total")
        elif name == "inference_batch_size_sum" and 'model="iris"' in labels:
            key = "batched_rows"
        elif name == "inference_batch_size_count" and 'model="iris"' in labels:
            key = "batches"
        else:
            continue
        counts[key] = counts.get(key, 0) + int(float(value))
    return counts


# --------------------------------------------------------------------------- wrk


def wrk(
    port: int, connections: int, seconds: int, opts: Options, target: str = "inferd"
) -> tuple[str, float]:
    """Run wrk; return its output and the CPU it used (100 = one core)."""
    name = target if target in REQUESTS else "post"
    script = opts.out / (f"{name}-tally.lua" if opts.tally else f"{name}.lua")
    cmd = f"wrk -t1 -c{connections} -d{seconds}s --latency --timeout 2s".split()
    cmd += ["-s", str(script), f"http://{HOST}:{port}/predict"]  # the script sets the path
    cmd = pinned(opts.cpus[1] if opts.cpus else None, cmd)
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    limit = seconds + WRK_SLACK_S
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=limit, check=False)
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic() - start
    if done.returncode != 0:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
    used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return done.stdout, 100 * used / wall


def parse_wrk(text: str) -> dict[str, Any]:
    """req/s, latency percentiles, non-2xx and socket errors, and the Lua status tally."""
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    if rps is None or total is None:
        raise RuntimeError(f"unexpected wrk output:\n{text}")
    pattern = r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$"
    ms = {p: float(v) * UNITS_MS[u] for p, v, u in re.findall(pattern, text, re.M)}
    errors = re.search(SOCKET_ERRORS, text)
    counts = [int(n) for n in errors.groups()] if errors else [0, 0, 0, 0]
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {
        "requests": int(total.group(1)),
        "rps": float(rps.group(1)),
        **{f"p{p}_ms": ms.get(p, 0.0) for p in ("50", "75", "90", "99")},
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
        "socket_errors": dict(zip(("connect", "read", "write", "timeout"), counts, strict=True)),
        "statuses": {s: int(n) for s, n in re.findall(r"^status (\d+) (\d+)$", text, re.M)},
    }


def bench_target(target: str, models_dir: Path, opts: Options, round: int = 1) -> list[Run]:
    runs = []
    inferd = target.startswith("inferd")
    with server(target, models_dir, opts) as (pid, port):
        for conns in opts.connections:
            if opts.warmup:
                wrk(port, conns, opts.warmup, opts, target)
            before = server_counters(port) if inferd else {}
            busy_before = monitor_seconds(port) if inferd else None
            cpu_before, start = cpu_seconds(pid), time.monotonic()
            text, wrk_cpu = wrk(port, conns, opts.duration, opts, target)
            server_cpu = 100 * (cpu_seconds(pid) - cpu_before) / (time.monotonic() - start)
            run = Run(target, conns, **parse_wrk(text), rss_mib=rss_mib(pid), round=round)
            run.server_cpu_pct, run.wrk_cpu_pct = server_cpu, wrk_cpu
            after = server_counters(port) if inferd else {}
            busy_after = monitor_seconds(port) if inferd else None
            if busy_before is not None and busy_after is not None and run.requests:
                run.monitor_us = (busy_after - busy_before) / run.requests * 1e6
            run.server = {k: n - before.get(k, 0) for k, n in after.items() if n > before.get(k, 0)}
            runs.append(run)
            print(f"  -c{conns}: {run.rps:,.0f} req/s, p99 {run.p99_ms:.2f} ms", file=sys.stderr)
    return runs


# --------------------------------------------------------------------------- report


def machine() -> dict[str, Any]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    git = ["git", "-C", str(ROOT), "describe", "--always", "--dirty"]
    commit = subprocess.run(git, capture_output=True, text=True, check=False).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "cpu_model": model.group(1).strip() if model else platform.processor(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "loadavg_1m_at_start": os.getloadavg()[0],
        "commit": commit or None,
    }


def count_504(run: Run) -> int | None:
    if run.statuses:  # wrk's own tally
        return run.statuses.get("504", 0)
    if run.server or run.target.startswith("inferd"):  # the server's count
        return run.server.get("status_504", 0)
    return 0 if run.non_2xx == 0 else None


def checks(runs: dict[tuple[str, int], Run]) -> list[dict[str, Any]]:
    """The project's goals for inferd, at the connection counts that were run."""
    goals: list[tuple[int, str, str, bool]] = []  # connections, goal, measured, met
    if r := runs.get(("inferd", 50)):
        goals.append((50, "req/s >= 10,000", f"{r.rps:,.0f} req/s", r.rps >= 10_000))
        goals.append((50, "p99 < 10 ms", f"{r.p99_ms:.2f} ms", r.p99_ms < 10))
    if r := runs.get(("inferd", 1)):
        goals.append((1, "p50 < 0.5 ms", f"{r.p50_ms:.3f} ms", r.p50_ms < 0.5))
    if r := runs.get(("inferd", 256)):
        n = count_504(r)
        shown = f"{n} x 504" if n is not None else f"{r.non_2xx} non-2xx of unknown status"
        goals.append((256, "zero 504s", shown, n == 0))
        goals.append((256, "p99 < 100 ms", f"{r.p99_ms:.2f} ms", r.p99_ms < 100))
    keys = ("connections", "goal", "measured", "pass")
    return [dict(zip(keys, goal, strict=True)) for goal in goals]


def ratios(runs: dict[tuple[str, int], Run], connections: list[int]) -> list[dict[str, Any]]:
    """inferd's req/s and p99 over each baseline's, at each connection count."""
    out = []
    for conns in connections:
        for base in BASELINES:
            mine, other = runs.get(("inferd", conns)), runs.get((base, conns))
            if mine and other:
                rps = mine.rps / other.rps if other.rps else None
                p99 = mine.p99_ms / other.p99_ms if other.p99_ms else None
                out.append({"connections": conns, "baseline": base, "rps": rps, "p99": p99})
    return out


def protocols(runs: list[Run], connections: list[int]) -> list[dict[str, Any]]:
    """The Open Inference Protocol's req/s, p99 and server CPU per request over /v1's, at
    each connection count: the ratio of each round, and their median."""
    out = []
    for conns in connections:
        for target in PROTOCOLS:
            rps, p99, cpu = [], [], []
            for v1 in (r for r in runs if r.target == "inferd-v1" and r.connections == conns):
                other = next(
                    (
                        r
                        for r in runs
                        if r.target == target and r.connections == conns and r.round == v1.round
                    ),
                    None,
                )
                if other is None or not (v1.rps and v1.p99_ms):
                    continue
                rps.append(other.rps / v1.rps)
                p99.append(other.p99_ms / v1.p99_ms)
                mine, base = cpu_us(other), cpu_us(v1)
                cpu.append(mine / base if mine and base else None)
            if rps:
                out.append(
                    {
                        "connections": conns,
                        "target": target,
                        "rounds": len(rps),
                        "rps": median(list(rps)),
                        "rps_by_round": rps,
                        "p99": median(list(p99)),
                        "cpu_per_request": median(cpu),
                    }
                )
    return out


def cpu_us(run: Run) -> float | None:
    """Server CPU time per answered request, in microseconds."""
    return run.server_cpu_pct / 100 / run.rps * 1e6 if run.rps else None


def pair_costs(runs: list[Run], on_target: str, off_target: str) -> list[dict[str, Any]]:
    """One target (on) against another (off), round by round and load by load."""
    out = []
    for on in runs:
        off = next(
            (
                r
                for r in runs
                if r.target == off_target and (r.connections, r.round) == (on.connections, on.round)
            ),
            None,
        )
        if on.target != on_target or off is None:
            continue
        out.append(
            {
                "round": on.round,
                "connections": on.connections,
                "rps_on": on.rps,
                "rps_off": off.rps,
                "rps_change": on.rps / off.rps - 1 if off.rps else None,
                "p50_on_ms": on.p50_ms,
                "p50_off_ms": off.p50_ms,
                "p99_on_ms": on.p99_ms,
                "p99_off_ms": off.p99_ms,
                "cpu_us_on": cpu_us(on),
                "cpu_us_off": cpu_us(off),
            }
        )
    return out


def pair_section(title: str, legend: str, rows: list[dict[str, Any]]) -> list[str]:
    """A report section of :func:`pair_costs`: a table, then the medians per load."""
    lines = [
        "",
        f"## {title}",
        "",
        legend,
        "",
        "| round | conns | req/s on | req/s off | change | p50 ms on | p50 ms off | p99 ms on "
        "| p99 ms off | CPU µs/req on | CPU µs/req off |",
        "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for d in rows:
        lines.append(
            f"| {d['round']} | {d['connections']} | {d['rps_on']:,.0f} | {d['rps_off']:,.0f} "
            f"| {percent(d['rps_change'])} | {d['p50_on_ms']:.2f} | {d['p50_off_ms']:.2f} "
            f"| {d['p99_on_ms']:.2f} | {d['p99_off_ms']:.2f} "
            f"| {d['cpu_us_on'] or 0:.1f} | {d['cpu_us_off'] or 0:.1f} |"
        )
    lines.append("")
    for conns in sorted({d["connections"] for d in rows}):
        at = [d for d in rows if d["connections"] == conns]
        change = median([d["rps_change"] for d in at])
        on, off = median([d["cpu_us_on"] for d in at]), median([d["cpu_us_off"] for d in at])
        lines.append(
            f"- {conns} connection(s), median of {len(at)} round(s): req/s {percent(change)}; "
            f"server CPU {on or 0:.1f} µs/request on, {off or 0:.1f} off."
        )
    return lines


def drift_costs(runs: list[Run]) -> list[dict[str, Any]]:
    """Drift monitoring on (inferd) against off (inferd-nodrift), round by round."""
    out = []
    for on in runs:
        off = next(
            (
                r
                for r in runs
                if r.target == "inferd-nodrift"
                and (r.connections, r.round) == (on.connections, on.round)
            ),
            None,
        )
        if on.target != "inferd" or off is None:
            continue
        out.append(
            {
                "round": on.round,
                "connections": on.connections,
                "rps_on": on.rps,
                "rps_off": off.rps,
                "rps_change": on.rps / off.rps - 1 if off.rps else None,
                "p99_on_ms": on.p99_ms,
                "p99_off_ms": off.p99_ms,
                "cpu_us_on": cpu_us(on),
                "cpu_us_off": cpu_us(off),
                "monitor_us": on.monitor_us,
                "mean_batch": (
                    on.server["batched_rows"] / on.server["batches"]
                    if on.server.get("batches")
                    else None
                ),
            }
        )
    return out


def median(values: list[float | None]) -> float | None:
    known = sorted(v for v in values if v is not None)
    if not known:
        return None
    mid = len(known) // 2
    return known[mid] if len(known) % 2 else (known[mid - 1] + known[mid]) / 2


def percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.1%}"


def times(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def markdown(report: dict[str, Any]) -> str:
    m, s = report["machine"], report["settings"]
    where = "servers on CPU {}, wrk on CPU {}".format(*s["cpus"]) if s["cpus"] else "not pinned"
    lines = [
        f"# inferd benchmark, {report['date']}",
        "",
        f"Machine: {m['nproc']} CPUs ({m['cpu_model']}), Linux {m['kernel']}, Python "
        f"{m['python']}, load average {m['loadavg_1m_at_start']:.2f} at start, commit "
        f"{m['commit'] or 'unknown'}.",
        f"wrk -t1, closed loop, {s['duration']} s per run after a {s['warmup']} s warm-up, "
        f"{where}.",
        "",
        "| target | conns | req/s | p50 ms | p90 ms | p99 ms | non-2xx | sock err | RSS MiB "
        "| server CPU % | wrk CPU % |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    notes = []
    rounds = s.get("rounds", 1) > 1
    for r in (Run(**run) for run in report["runs"]):
        errors = sum(r.socket_errors.values())
        name = f"{r.target} (round {r.round})" if rounds else r.target
        lines.append(
            f"| {name} | {r.connections} | {r.rps:,.0f} | {r.p50_ms:.2f} | {r.p90_ms:.2f} "
            f"| {r.p99_ms:.2f} | {r.non_2xx} | {errors} | {r.rss_mib:.0f} "
            f"| {r.server_cpu_pct:.0f} | {r.wrk_cpu_pct:.0f} |"
        )
        if r.non_2xx or errors:
            parts = [f"{n} x {c}" for c, n in sorted(r.statuses.items()) if c[0] != "2"]
            shed = ("request_timeouts", "queue_rejections")
            parts += [f"server {k} {n}" for k, n in sorted(r.server.items()) if k in shed]
            parts += [f"{n} socket {k} errors" for k, n in r.socket_errors.items() if n]
            notes.append(f"- {r.target} at {r.connections}: " + ", ".join(parts))
    if notes:
        lines += ["", "Non-2xx responses and socket errors:", "", *notes]
    if report["ratios"]:
        lines.append(
            "\n## inferd against the baselines\n\n"
            "A req/s ratio above 1 and a p99 ratio below 1 favour inferd.\n\n"
            "| conns | baseline | req/s ratio | p99 ratio |\n|--:|---|--:|--:|"
        )
        for x in report["ratios"]:
            lines.append(
                f"| {x['connections']} | {x['baseline']} | {times(x['rps'])} | {times(x['p99'])} |"
            )
    if report.get("drift"):
        lines += [
            "",
            "## Drift monitoring on vs off",
            "",
            "inferd with its defaults (drift monitoring on) against `INFERD_DRIFT_ENABLED=false`;",
            "monitor µs/req: the monitor's binning and export time (its own clock) per request.",
            "",
            "| round | conns | req/s on | req/s off | change | p99 ms on | p99 ms off "
            "| CPU µs/req on | CPU µs/req off | monitor µs/req | mean batch |",
            "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for d in report["drift"]:
            on_us, off_us = d["cpu_us_on"], d["cpu_us_off"]
            lines.append(
                f"| {d['round']} | {d['connections']} | {d['rps_on']:,.0f} | {d['rps_off']:,.0f} "
                f"| {percent(d['rps_change'])} | {d['p99_on_ms']:.2f} | {d['p99_off_ms']:.2f} "
                f"| {on_us or 0:.1f} | {off_us or 0:.1f} | {d['monitor_us'] or 0:.2f} "
                f"| {d['mean_batch'] or 0:.1f} |"
            )
        lines.append("")
        for conns in sorted({d["connections"] for d in report["drift"]}):
            at = [d for d in report["drift"] if d["connections"] == conns]
            change = median([d["rps_change"] for d in at])
            on, off = median([d["cpu_us_on"] for d in at]), median([d["cpu_us_off"] for d in at])
            own = median([d["monitor_us"] for d in at])
            lines.append(
                f"- {conns} connection(s), median of {len(at)} round(s): req/s {percent(change)} "
                f"with drift on; server CPU {on or 0:.1f} µs/request on, {off or 0:.1f} off; "
                f"the monitor's own time {own or 0:.2f} µs/request."
            )
    if report.get("tracing"):
        lines += pair_section(
            "Tracing on vs off",
            "inferd-tracing (tracing on, every request sampled, OTLP/HTTP to a sink on loopback) "
            "against inferd (tracing off).",
            report["tracing"],
        )
    if report.get("tracing_off"):
        lines += pair_section(
            "inferd against inferd-baseline",
            "inferd (this checkout, tracing off) against inferd-baseline (--baseline-src).",
            report["tracing_off"],
        )
    if report.get("protocols"):
        lines.append(
            "\n## The Open Inference Protocol against /v1\n\n"
            "V2 infer's req/s, p99 and server CPU per request over "
            "`POST /v1/models/iris/predict`'s (inferd-v1), the same one row; medians of the "
            "rounds' ratios (each round's in brackets).\n\n"
            "| conns | target | req/s ratio | p99 ratio | CPU/request ratio |\n"
            "|--:|---|--:|--:|--:|"
        )
        for x in report["protocols"]:
            each = ", ".join(f"{v:.0%}" for v in x["rps_by_round"])
            lines.append(
                f"| {x['connections']} | {x['target']} | {x['rps']:.0%} ({each}) "
                f"| {times(x['p99'])} | {times(x['cpu_per_request'])} |"
            )
    if report["checks"]:
        lines += ["", "## Goals", ""]
        for c in report["checks"]:
            lines.append(
                f"- {'PASS' if c['pass'] else 'FAIL'} at {c['connections']} "
                f"connection(s): {c['goal']} (measured {c['measured']})"
            )
    if floor := [x for x in report["ratios"] if x["baseline"] == "raw-asgi" and x["rps"]]:
        shares = ", ".join(f"{x['rps']:.0%} at {x['connections']} connection(s)" for x in floor)
        lines += ["", f"inferd's req/s as a share of the raw-ASGI floor: {shares}."]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None) -> Options:
    def counts(text: str) -> list[int]:
        values = [int(part) for part in text.split(",") if part.strip()]
        if not values or min(values) < 1:
            raise argparse.ArgumentTypeError("expected positive integers, e.g. 1,50,256")
        return values

    def names(text: str) -> list[str]:
        values = [part.strip() for part in text.split(",") if part.strip()]
        if not values or not set(values) <= set(TARGETS):
            raise argparse.ArgumentTypeError(f"expected names from {','.join(TARGETS)}")
        return values

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    p = argparse.ArgumentParser(description="Load-test inferd and two baselines with wrk.")
    p.add_argument(
        "--targets",
        type=names,
        default=list(DEFAULT_TARGETS),
        help=f"of {','.join(TARGETS)}; default: {','.join(DEFAULT_TARGETS)}",
    )
    p.add_argument("--connections", type=counts, default=[1, 50, 256], help="default: 1,50,256")
    p.add_argument("--duration", type=int, default=10, help="seconds per measured run")
    p.add_argument("--warmup", type=int, default=2, help="seconds of load before each, discarded")
    p.add_argument("--rounds", type=int, default=1, help="run the targets this many times in turn")
    p.add_argument("--models-dir", type=Path, help="where the demo models are (default: temp)")
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / stamp)
    p.add_argument("--no-pin", action="store_true", help="leave server and wrk unpinned")
    p.add_argument("--no-tally", action="store_true", help="skip wrk's per-status count")
    p.add_argument(
        "--baseline-src", type=Path, help="a checkout to serve as the inferd-baseline target"
    )
    p.add_argument(
        "--model",
        help="the demo model inferd's /predict serves (default: iris; e.g. iris-forest, whose "
        "batch costs ~8 ms, for inferd-cache)",
    )
    a = p.parse_args(argv)
    if "inferd-baseline" in a.targets and a.baseline_src is None:
        p.error("the inferd-baseline target needs --baseline-src DIR (a checkout of inferd)")
    if a.duration < 1 or a.warmup < 0 or a.rounds < 1:
        p.error("--duration and --rounds must be at least 1 and --warmup at least 0")
    allowed = sorted(os.sched_getaffinity(0))
    pin = not a.no_pin and shutil.which("taskset") is not None and len(allowed) >= 2
    cpus = (allowed[0], allowed[1]) if pin else None
    given = {k: v for k, v in vars(a).items() if not k.startswith("no_")}
    return Options(**given, cpus=cpus, tally=not a.no_tally)


def ensure_models(models_dir: Path) -> None:
    """Write the demo models unless they are there already."""
    models_dir.mkdir(parents=True, exist_ok=True)
    cmd = [str(BIN / "inferd"), "models", "train-demo", "--models-dir", str(models_dir)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0 or not (models_dir / "iris" / "1" / "model.joblib").is_file():
        raise RuntimeError(f"inferd models train-demo failed:\n{done.stdout}{done.stderr}")


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if shutil.which("wrk") is None:
        print("wrk is not installed (Debian and Ubuntu: apt-get install -y wrk)", file=sys.stderr)
        return 2
    # SIGTERM and SIGHUP unwind like Ctrl-C does, stopping every server on the way out.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _: sys.exit(128 + signum))
    opts.out = opts.out.resolve()
    opts.out.mkdir(parents=True, exist_ok=True)
    (opts.out / "post.lua").write_text(LUA)
    (opts.out / "post-tally.lua").write_text(LUA + LUA_TALLY)
    for name, lua in REQUESTS.items():
        (opts.out / f"{name}.lua").write_text(lua)
        (opts.out / f"{name}-tally.lua").write_text(lua + LUA_TALLY)
    started = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    host = machine()
    runs: list[Run] = []
    with tempfile.TemporaryDirectory(prefix="inferd-bench-") as scratch:
        models_dir = (opts.models_dir or Path(scratch)).resolve()
        ensure_models(models_dir)
        for round in range(1, opts.rounds + 1):
            for target in opts.targets:
                print(f"benchmarking {target} (round {round})", file=sys.stderr, flush=True)
                runs += bench_target(target, models_dir, opts, round)
    by_key = {(r.target, r.connections): r for r in runs}
    report = {
        "date": started,
        "machine": host,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in asdict(opts).items()},
        "runs": [asdict(r) for r in runs],
        "ratios": ratios(by_key, opts.connections),
        "checks": checks(by_key),
        "drift": drift_costs(runs),
        "tracing": pair_costs(runs, "inferd-tracing", "inferd"),
        "tracing_off": pair_costs(runs, "inferd", "inferd-baseline"),
        "protocols": protocols(runs, opts.connections),
    }
    (opts.out / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    (opts.out / "report.md").write_text(text)
    print(text)
    print(f"reports written to {opts.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("interrupted; every server was stopped", file=sys.stderr)
        sys.exit(130)
