"""Overload, measured open-loop: inferd at 0.5x to 8x its measured capacity.

    python bench/overload.py [--multiples 0.5,1,2,4,8] [--duration 5] [--recovery 5]
                             [--connections 256] [--targets inferd[,inferd-baseline]]
                             [--baseline-src DIR] [--out DIR]

For each target: start ``inferd serve`` (CPU 0, access log and metrics on, the defaults), measure
its capacity with wrk (50 connections, closed loop), then for each multiple run
``bench/openloop.c`` (built here with ``cc``; CPU 1): ``multiple x capacity`` requests per
second for ``--duration`` seconds, then half the capacity for ``--recovery`` seconds. Latency
counts from each request's scheduled send time, so requests that waited for a free connection
in the generator are charged for it (no coordinated omission). bench/README.md explains the
figures.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"
BODY = '{"features": [5.1, 3.5, 1.4, 0.2]}'
RECORD = np.dtype([("due", "<i8"), ("latency", "<i8"), ("status", "<i4"), ("phase", "<i4")])
WINDOW_S = 0.1  # recovery is judged on windows of this length (by scheduled time)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def pin(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and os.cpu_count() != 1 else []


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{port}/health/ready", timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


@contextlib.contextmanager
def server(
    target: str, models: Path, out: Path, baseline_src: Path | None, deadline_ms: float
) -> Iterator[tuple[int, int]]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERD_")}
    env["INFERD_ACCESS_LOG"] = "true"
    env["INFERD_REQUEST_TIMEOUT_MS"] = str(deadline_ms)
    env["INFERD_WORKERS"] = "0"
    if target == "inferd-baseline":
        assert baseline_src is not None
        env["PYTHONPATH"] = str(baseline_src.resolve() / "src")
    cmd = [*pin(0), sys.executable, "-m", "inferd", "serve", "--host", HOST, "--port", str(port)]
    cmd += ["--models-dir", str(models), "--log-format", "json"]
    log = (out / f"{target}.log").open("wb")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"{target} exited; see {out / f'{target}.log'}")
            if ready(port):
                break
            time.sleep(0.1)
        else:
            raise RuntimeError(f"{target} did not become ready")
        yield proc.pid, port
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def capacity(port: int, out: Path, seconds: int) -> float:
    script = out / "post.lua"
    script.write_text(
        f"wrk.method = \"POST\"\nwrk.body = '{BODY}'\n"
        'wrk.headers["Content-Type"] = "application/json"\n'
    )
    base = [*pin(1), "wrk", "-t1", "-c50", "-s", str(script), f"http://{HOST}:{port}/predict"]
    subprocess.run([*base[:-1], "-d2s", base[-1]], capture_output=True, check=True)
    text = subprocess.run(
        [*base[:-1], f"-d{seconds}s", base[-1]], capture_output=True, text=True, check=True
    ).stdout
    match = re.search(r"Requests/sec:\s+([\d.]+)", text)
    assert match is not None, text
    return float(match.group(1))


def build_generator(out: Path) -> Path:
    binary = out / "openloop"
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise SystemExit("a C compiler (cc) is needed to build bench/openloop.c")
    subprocess.run([cc, "-O2", "-o", str(binary), str(ROOT / "bench" / "openloop.c")], check=True)
    return binary


def percentile(values: np.ndarray, q: float) -> float | None:
    return float(np.percentile(values, q)) if len(values) else None


def summarize(
    records: np.ndarray, rate: float, seconds: float, recovery: float, deadline_ms: float
) -> dict[str, Any]:
    ms = records["latency"] / 1e6
    status = records["status"]
    over = records["phase"] == 0
    ok = over & (status >= 200) & (status < 300)
    shed = over & ((status == 503) | (status == 429))
    # Goodput: 2xx answers received during the overload phase (by when they arrived).
    done_s = (records["due"] + records["latency"]) / 1e9
    served = ok & (done_s <= seconds)
    result: dict[str, Any] = {
        "offered_rps": rate,
        "scheduled": int(over.sum()),
        "goodput_rps": float(served.sum()) / seconds,
        "goodput_in_time_rps": float((served & (ms <= deadline_ms)).sum()) / seconds,
        "accepted_p50_ms": percentile(ms[ok], 50),
        "accepted_p99_ms": percentile(ms[ok], 99),
        "accepted_late": int((ok & (ms > deadline_ms)).sum()),
        "rejected": int(shed.sum()),
        "rejected_p50_ms": percentile(ms[shed], 50),
        "rejected_p99_ms": percentile(ms[shed], 99),
        "timeouts_504": int((over & (status == 504)).sum()),
        "errors": int((over & (status == 0)).sum()),
        "unsent": int((over & (status == -1)).sum()),
        "other": int((over & (status >= 300) & ~np.isin(status, (429, 503, 504))).sum()),
    }
    # Recovery: windows of the recovery phase (by scheduled time) in which some request was
    # not answered 2xx within the deadline; recovered after the last such window.
    rec = records[records["phase"] == 1]
    start = seconds * 1e9
    bad = rec[(rec["status"] < 200) | (rec["status"] >= 300) | (rec["latency"] / 1e6 > deadline_ms)]
    if len(bad) == 0:
        result["recovery_s"] = 0.0
    else:
        last = float(bad["due"].max() - start) / 1e9
        windows = int(last / WINDOW_S) + 1
        result["recovery_s"] = windows * WINDOW_S
        result["recovered"] = result["recovery_s"] < recovery - WINDOW_S
    result.setdefault("recovered", True)
    return result


def run_multiple(
    generator: Path,
    port: int,
    pid: int,
    rate: float,
    opts: argparse.Namespace,
    out: Path,
    name: str,
    cap: float,
) -> dict[str, Any]:
    path = out / f"{name}.bin"
    phases = f"{rate:.0f}:{opts.duration},{cap * 0.5:.0f}:{opts.recovery}"
    cmd = [*pin(1), str(generator), "-a", HOST, "-p", str(port), "-u", "/predict"]
    cmd += ["-b", BODY, "-c", str(opts.connections), "-s", phases, "-o", str(path), "-w", "5"]
    samples: list[float] = []
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            samples.append(rss_mib(pid))
            stop.wait(0.2)

    sampler = threading.Thread(target=sample)
    before = rss_mib(pid)
    sampler.start()
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    finally:
        stop.set()
        sampler.join()
    records = np.fromfile(path, dtype=RECORD)
    result = summarize(records, rate, opts.duration, opts.recovery, opts.deadline_ms)
    result.update(
        rss_before_mib=before, rss_max_mib=max(samples, default=before), rss_after_mib=rss_mib(pid)
    )
    result["generator"] = done.stderr.strip()
    return result


def fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return f"{value:,}"


def report(results: dict[str, Any], opts: argparse.Namespace) -> str:
    lines = [
        f"# Overload, open loop ({dt.datetime.now(dt.UTC).isoformat(timespec='seconds')})",
        "",
        f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the end; server on "
        f"CPU 0, generator on CPU 1; {opts.connections} connections; {opts.duration} s at each "
        f"multiple, then {opts.recovery} s at 0.5x; deadline {opts.deadline_ms:g} ms.",
        "",
    ]
    for target, data in results.items():
        lines += [
            f"## {target}: capacity {data['capacity_rps']:,.0f} req/s (wrk, 50 connections)",
            "",
            "| multiple | offered/s | goodput/s | goodput / capacity | within deadline/s "
            "| accepted p50 ms | accepted p99 ms | rejected | rejected p99 ms | 504 | errors "
            "| unsent | RSS MiB before / max / after | recovery s |",
            "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for m, r in data["multiples"].items():
            rss = f"{r['rss_before_mib']:.0f} / {r['rss_max_mib']:.0f} / {r['rss_after_mib']:.0f}"
            recovery = fmt(r["recovery_s"]) if r["recovered"] else f"> {opts.recovery - 0.1:g}"
            lines.append(
                f"| {m}x | {fmt(r['offered_rps'], 0)} | {fmt(r['goodput_rps'], 0)} "
                f"| {r['goodput_rps'] / data['capacity_rps']:.0%} "
                f"| {fmt(r['goodput_in_time_rps'], 0)} | {fmt(r['accepted_p50_ms'], 2)} "
                f"| {fmt(r['accepted_p99_ms'], 2)} | {fmt(r['rejected'])} "
                f"| {fmt(r['rejected_p99_ms'], 2)} | {fmt(r['timeouts_504'])} "
                f"| {fmt(r['errors'])} | {fmt(r['unsent'])} | {rss} | {recovery} |"
            )
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--targets", default="inferd")
    p.add_argument("--baseline-src", type=Path)
    p.add_argument("--multiples", default="0.5,1,2,4,8")
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--recovery", type=float, default=5.0)
    p.add_argument("--connections", type=int, default=256)
    p.add_argument("--capacity-seconds", type=int, default=5)
    p.add_argument("--deadline-ms", type=float, default=100.0)
    p.add_argument("--out", type=Path)
    opts = p.parse_args(argv)
    targets = opts.targets.split(",")
    if "inferd-baseline" in targets and opts.baseline_src is None:
        p.error("the inferd-baseline target needs --baseline-src DIR")
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    out = opts.out or ROOT / "bench" / "results" / f"overload-{stamp}"
    out.mkdir(parents=True, exist_ok=True)
    generator = build_generator(out)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="inferd-overload-") as tmp:
        models = Path(tmp) / "models"
        subprocess.run(
            [str(BIN / "inferd"), "models", "train-demo", "--models-dir", str(models)],
            check=True, capture_output=True,
        )  # fmt: skip
        for target in targets:
            with server(target, models, out, opts.baseline_src, opts.deadline_ms) as (pid, port):
                cap = capacity(port, out, opts.capacity_seconds)
                print(f"{target}: capacity {cap:,.0f} req/s", flush=True)
                data: dict[str, Any] = {"capacity_rps": cap, "multiples": {}}
                for m in (float(x) for x in opts.multiples.split(",")):
                    r = run_multiple(generator, port, pid, m * cap, opts, out, f"{target}-{m}", cap)
                    data["multiples"][f"{m:g}"] = r
                    print(
                        f"  {m:g}x: goodput {r['goodput_rps']:,.0f}/s, accepted p99 "
                        f"{fmt(r['accepted_p99_ms'], 2)} ms, rejected {r['rejected']} (p99 "
                        f"{fmt(r['rejected_p99_ms'], 2)} ms), 504 {r['timeouts_504']}, errors "
                        f"{r['errors']}, unsent {r['unsent']}, recovery {r['recovery_s']:.1f} s",
                        flush=True,
                    )
                results[target] = data
    text = report(results, opts)
    (out / "report.md").write_text(text + "\n")
    (out / "report.json").write_text(json.dumps({"options": vars(opts), "results": results},
                                                default=str, indent=2))  # fmt: skip
    print(text)
    print(f"reports written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
