"""One server process against several (``inferd serve --processes N``), with wrk.

Pinning (a 2-CPU machine): the one-process server runs on CPU 0 and wrk on CPU 1, as in
bench/run.py. A server of N processes gets CPUs 0..N-1 (``taskset -c 0-(N-1)``) and wrk runs on
the same CPUs as the server, unpinned among them; with N = 2 on 2 CPUs wrk then takes its
cycles from the server's, so the scaling ratio measured here is a floor, not what a machine with
a spare core for the load generator would show. Server CPU is summed over the supervisor and
every process it started, and divided by the requests answered (CPU µs per request).

    flock /work/heavy.lock .venv/bin/python bench/processes.py --processes 1,2
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
BODY = '{"features": [5.1, 3.5, 1.4, 0.2]}'
TICK_S = 1 / os.sysconf("SC_CLK_TCK")
UNITS_MS = {"us": 1e-3, "ms": 1.0, "s": 1e3}
LUA = (
    f"wrk.method = \"POST\"\nwrk.body = '{BODY}'\n"
    'wrk.headers["Content-Type"] = "application/json"\n'
)


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def tree(pid: int) -> list[int]:
    """``pid`` and every descendant."""
    found = [pid]
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            for child in (task / "children").read_text().split():
                found += tree(int(child))
    return found


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) * TICK_S


def ready(port: int) -> bool:
    import http.client

    try:
        conn = http.client.HTTPConnection(HOST, port, timeout=2)
        conn.request("GET", "/health/ready")
        return conn.getresponse().status == 200
    except OSError:
        return False


@contextlib.contextmanager
def server(processes: int, models_dir: Path, out: Path) -> Iterator[tuple[int, int]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERD_")}
    env["INFERD_ACCESS_LOG"] = "true"
    cpus = "0" if processes == 1 else f"0-{processes - 1}"
    cmd = ["taskset", "-c", cpus, str(BIN / "inferd"), "serve", "--host", HOST, "--port",
           str(port), "--models-dir", str(models_dir), "--processes", str(processes),
           "--log-format", "json"]  # fmt: skip
    with (out / f"server-{processes}.log").open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=out)
        try:
            deadline = time.monotonic() + 120
            while not ready(port):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"server did not come up; see {log.name}")
                time.sleep(0.2)
            yield proc.pid, port
        finally:
            proc.terminate()
            proc.wait(30)


def wrk(port: int, connections: int, seconds: int, cpus: str, out: Path) -> tuple[str, float]:
    script = out / "post.lua"
    script.write_text(LUA)
    cmd = ["taskset", "-c", cpus, "wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency",
           "--timeout", "2s", "-s", str(script), f"http://{HOST}:{port}/predict"]  # fmt: skip
    before, start = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic()
    done = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=seconds + 30)
    after, wall = resource.getrusage(resource.RUSAGE_CHILDREN), time.monotonic() - start
    used = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return done.stdout, 100 * used / wall


def parse(text: str) -> dict[str, Any]:
    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    total = re.search(r"(\d+) requests in", text)
    if rps is None or total is None:
        raise RuntimeError(f"unexpected wrk output:\n{text}")
    pattern = r"^\s+(50|99)%\s+([\d.]+)(us|ms|s)\s*$"
    ms = {p: float(v) * UNITS_MS[u] for p, v, u in re.findall(pattern, text, re.M)}
    non_2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    return {
        "rps": float(rps.group(1)),
        "requests": int(total.group(1)),
        "p50_ms": ms.get("50", 0.0),
        "p99_ms": ms.get("99", 0.0),
        "non_2xx": int(non_2xx.group(1)) if non_2xx else 0,
    }


def measure(processes: int, connections: int, opts: Any, models_dir: Path) -> dict[str, Any]:
    wrk_cpus = "1" if processes == 1 else f"0-{processes - 1}"
    with server(processes, models_dir, opts.out) as (pid, port):
        wrk(port, connections, opts.warmup, wrk_cpus, opts.out)
        pids = tree(pid)
        before = {p: cpu_seconds(p) for p in pids}
        start = time.monotonic()
        text, wrk_cpu = wrk(port, connections, opts.duration, wrk_cpus, opts.out)
        wall = time.monotonic() - start
        used = {p: cpu_seconds(p) - before[p] for p in pids}
    result = parse(text)
    total = sum(used.values())
    result.update(
        processes=processes,
        connections=connections,
        server_cpu_pct=100 * total / wall,
        per_process_cpu_pct=sorted((round(100 * u / wall) for u in used.values()), reverse=True),
        wrk_cpu_pct=wrk_cpu,
        cpu_us_per_request=total / max(result["requests"], 1) * 1e6,
    )
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--processes", default="1,2")
    p.add_argument("--connections", default="50,256")
    p.add_argument("--duration", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=1)
    opts = p.parse_args()
    opts.out = Path(tempfile.mkdtemp(prefix="inferd-bench-processes-"))
    models_dir = opts.out / "models"
    subprocess.run(
        [str(BIN / "inferd"), "models", "train-demo", "--models-dir", str(models_dir)],
        check=True, capture_output=True,
    )  # fmt: skip
    counts = [int(n) for n in opts.processes.split(",")]
    results = []
    for round_ in range(opts.rounds):
        for connections in (int(c) for c in opts.connections.split(",")):
            for processes in counts:
                r = measure(processes, connections, opts, models_dir)
                r["round"] = round_ + 1
                results.append(r)
                print(r, file=sys.stderr, flush=True)
    print(f"{os.cpu_count()} CPUs; {opts.duration} s per run after {opts.warmup} s warm-up; "
          f"wrk -t1; access log on")  # fmt: skip
    print("| round | processes | connections | req/s | p50 ms | p99 ms | non-2xx | server CPU % "
          "(per process) | wrk CPU % | server CPU µs/req |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['round']} | {r['processes']} | {r['connections']} | {r['rps']:,.0f} | "
              f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['non_2xx']} | "
              f"{r['server_cpu_pct']:.0f} ({', '.join(map(str, r['per_process_cpu_pct']))}) | "
              f"{r['wrk_cpu_pct']:.0f} | {r['cpu_us_per_request']:.0f} |")  # fmt: skip
    base = {(r["round"], r["connections"]): r["rps"] for r in results if r["processes"] == 1}
    for r in results:
        one = base.get((r["round"], r["connections"]))
        if r["processes"] > 1 and one:
            print(f"round {r['round']}, c={r['connections']}: {r['processes']} processes / 1 = "
                  f"{r['rps'] / one:.2f}x req/s")  # fmt: skip


if __name__ == "__main__":
    main()
