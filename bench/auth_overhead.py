"""What API keys and per-key limits cost on the prediction path.

    python bench/auth_overhead.py [--duration 10] [--connections 50] [--rounds 1]

Runs ``inferd serve`` twice on the same machine, server pinned to CPU 0 and wrk to CPU 1:
with authentication off, then with ``auth = "required"`` and a key that has a request rate
and a daily token budget far above the load (so every request is authenticated, rate-checked
and charged, and none is refused). Prints req/s and latency percentiles of both runs and
their ratio, and the server's CPU time per request (from /proc), which is steadier than req/s
on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

INFERD = str(Path(sys.executable).with_name("inferd"))
BODY = '{"features": [5.1, 3.5, 1.4, 0.2]}'


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def pin(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and os.cpu_count() else []


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def measure(
    work: Path, config: Path, key: str | None, duration: int, conns: int
) -> dict[str, float]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERD_")}
    log = (work / f"serve-{port}.log").open("wb")
    server = subprocess.Popen(
        [*pin(0), INFERD, "serve", "--config", str(config), "--port", str(port)],
        cwd=work, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}/predict"
    try:
        for _ in range(300):
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health/ready").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        header = f'wrk.headers["Authorization"] = "Bearer {key}"\n' if key else ""
        script = work / f"post-{port}.lua"
        script.write_text(
            f"wrk.method = \"POST\"\nwrk.body = '{BODY}'\n"
            f'wrk.headers["Content-Type"] = "application/json"\n{header}'
        )
        base = [*pin(1), "wrk", "-t1", f"-c{conns}", "--latency", "-s", str(script)]
        subprocess.run([*base, "-d2s", url], capture_output=True, check=True)  # warm-up
        cpu_before = cpu_seconds(server.pid)
        out = subprocess.run(
            [*base, f"-d{duration}s", url], capture_output=True, text=True, check=True
        ).stdout
        cpu = cpu_seconds(server.pid) - cpu_before
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(30)
        log.close()
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    done = re.search(r"(\d+) requests in", out)
    assert done is not None, out
    result = {
        "req_s": rps,
        "non_2xx": float(non2xx.group(1)) if non2xx else 0.0,
        "cpu_us": cpu / int(done.group(1)) * 1e6,
    }
    for pct in ("50", "90", "99"):
        match = re.search(rf"\s{pct}%\s+([\d.]+)(us|ms|s)", out)
        assert match is not None, out
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
        result[f"p{pct}_ms"] = float(match.group(1)) * scale
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=int, default=10)
    parser.add_argument("--connections", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=1, help="off and on, this many times")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="inferd-bench-auth-") as tmp:
        work = Path(tmp)
        subprocess.run(
            [INFERD, "models", "train-demo", "--models-dir", str(work / "models")],
            check=True, capture_output=True,
        )  # fmt: skip
        common = f'models_dir = "{work / "models"}"\ndata_dir = "{work / "data"}"\nworkers = 0\n'
        off = work / "off.toml"
        off.write_text(common + 'auth = "off"\n')
        on = work / "on.toml"
        on.write_text(common + 'auth = "required"\n')
        created = subprocess.run(
            [INFERD, "keys", "create", "--user", "bench", "--scopes", "predict",
             "--rate", "1000000/s", "--daily-tokens", "1000000000000", "--config", str(on)],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        key = created.stdout.strip()
        ratios = []
        for round_ in range(1, args.rounds + 1):
            # Alternate which goes first: a machine whose load drifts favours neither.
            order = ["off", "on"] if round_ % 2 else ["on", "off"]
            results = {}
            for which in order:
                config, presented = (off, None) if which == "off" else (on, key)
                results[which] = measure(work, config, presented, args.duration, args.connections)
            for which in ("off", "on"):
                r = results[which]
                print(
                    f"round {round_}: auth and limits {which:3s} {r['req_s']:8.0f} req/s  "
                    f"p50 {r['p50_ms']:.2f} ms  p90 {r['p90_ms']:.2f} ms  "
                    f"p99 {r['p99_ms']:.2f} ms  non-2xx {r['non_2xx']:.0f}  "
                    f"server CPU {r['cpu_us']:.0f} us/request"
                )
            a, b = results["off"], results["on"]
            ratios.append(b["req_s"] / a["req_s"])
            print(
                f"round {round_}: on/off: req/s x{ratios[-1]:.2f}, "
                f"p99 x{b['p99_ms'] / a['p99_ms']:.2f}, "
                f"server CPU per request x{b['cpu_us'] / a['cpu_us']:.2f}"
            )
    print(f"median of {len(ratios)} rounds: on/off req/s x{statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
