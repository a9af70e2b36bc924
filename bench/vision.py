"""ResNet18 served over HTTP versus the same model called directly: how much of the limit is left.

1. **Direct**: ResNet18 (torchvision's architecture, random weights) called in a loop in this
   process on already prepared 224x224 inputs, for each batch size; once as one loop with
   ``--threads`` torch threads, and once as ``--threads`` loops side by side with one torch
   thread each. The best of these is the model's limit on this machine.
2. **Served**: ``inferd serve`` with the same network as ``resnet18-*.pth`` in a repository,
   and wrk posting 224x224 RGB JPEGs (8 different pictures, raw bodies) to
   ``/v1/models/resnet18/classify`` from 16 connections in a closed loop. The server decodes,
   prepares, batches (``max_batch_size`` 16) and answers each picture, with
   ``--torch-threads`` (1) torch threads per batch and ``--threads / --torch-threads``
   batches at a time (``INFERD_BATCH_CONCURRENCY``).
3. ``--rounds`` times: the best batch size of each direct layout again, then a served run. The
   machine's load can change by the minute (other work on shared CPUs), so each served figure
   is set against the direct limit measured just before it; the median share is the result.

    .venv/bin/python bench/vision.py                      # ~7 minutes with the defaults
    .venv/bin/python bench/vision.py --duration 8 --batch-sizes 4,8 --rounds 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
HOST = "127.0.0.1"

_TOML = """\
runtime = "torch"
architecture = "resnet18"
description = "ResNet18, random weights (benchmark)"

[input]
type = "image"

[image]
size = 224

[batching]
max_batch_size = {max_batch}
"""

_LUA = """\
local bodies = {{}}
for i = 0, {n} - 1 do
  local f = assert(io.open("{folder}/" .. i .. ".jpg", "rb"))
  bodies[i + 1] = f:read("*all")
  f:close()
end
local i = 0
request = function()
  i = i % #bodies + 1
  return wrk.format("POST", "{path}", {{["Content-Type"] = "image/jpeg"}}, bodies[i])
end
"""


class Direct:
    """ResNet18 called in a loop in this process, on prepared inputs."""

    def __init__(self) -> None:
        import torch

        from inferd.models.resnet import build

        torch.manual_seed(0)
        self.torch = torch
        self.net = build("resnet18", 1000).eval()

    def measure(self, loops: int, per_loop: int, size: int, seconds: float) -> float:
        """Images per second of ``loops`` loops side by side, ``per_loop`` torch threads each."""
        import threading

        torch, net = self.torch, self.net
        torch.set_num_threads(per_loop)
        counts = [0] * loops

        def loop(at: int) -> None:
            x = torch.randn(size, 3, 224, 224)
            with torch.inference_mode():
                for _ in range(2):  # warm-up: first calls allocate
                    net(x)
                started = time.perf_counter()
                while time.perf_counter() - started < seconds:
                    torch.softmax(net(x), dim=1).numpy()
                    counts[at] += size

        workers = [threading.Thread(target=loop, args=(i,)) for i in range(loops)]
        started = time.perf_counter()
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
        return sum(counts) / (time.perf_counter() - started)


def sweep(
    model: Direct, batch_sizes: list[int], duration: float, threads: int
) -> dict[tuple[int, int, int], float]:
    """Every batch size, as one loop with ``threads`` torch threads and as ``threads`` loops
    with one torch thread each."""
    results = {}
    layouts = [(1, threads)] + ([(threads, 1)] if threads > 1 else [])
    for loops, per_loop in layouts:
        for size in batch_sizes:
            rate = model.measure(loops, per_loop, size, duration)
            results[(loops, per_loop, size)] = rate
            print(f"direct {_name((loops, per_loop, size)):<24}: {rate:7.1f} images/s", flush=True)
    return results


def _name(config: tuple[int, int, int]) -> str:
    loops, per_loop, size = config
    return f"{loops}x{per_loop} threads, batch {size}"


def write_repository(root: Path, max_batch: int) -> None:
    import torch

    from inferd.models.resnet import build

    torch.manual_seed(0)
    folder = root / "resnet18"
    (folder / "1").mkdir(parents=True)
    torch.save(build("resnet18", 1000).state_dict(), folder / "1" / "resnet18-bench.pth")
    (folder / "model.toml").write_text(_TOML.format(max_batch=max_batch))


def write_images(folder: Path, n: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True)
    for i in range(n):
        # Smooth colour fields with some noise: photo-like JPEG sizes (~10-20 KB).
        base = rng.integers(0, 256, size=(8, 8, 3), dtype=np.uint8)
        img = Image.fromarray(base).resize((224, 224), Image.Resampling.BICUBIC)
        noise = rng.normal(0, 12, size=(224, 224, 3))
        pixels = np.clip(np.asarray(img, dtype=np.float64) + noise, 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(folder / f"{i}.jpg", quality=90)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def wait_ready(port: int, proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"inferd exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health/ready", timeout=1) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.2)
    raise SystemExit("inferd did not become ready")


def wrk(url: str, script: Path, connections: int, duration: int) -> dict[str, Any]:
    cmd = [
        "wrk", "-t1", f"-c{connections}", f"-d{duration}s", "--latency", "--timeout", "10s",
        "-s", str(script), url,
    ]  # fmt: skip
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    seconds = _seconds(re.search(r"requests in ([\d.]+\w+),", out).group(1))  # type: ignore[union-attr]
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errors = re.search(r"Socket errors: (.*)", out)
    return {
        "requests": requests,
        "images_per_s": requests / seconds,
        "p50_ms": _percentile(out, 50),
        "p99_ms": _percentile(out, 99),
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1) if errors else "",
    }


def _percentile(out: str, p: int) -> float:
    # "     99%  492.00ms" in the latency distribution (not the "+/- Stdev" column)
    found = re.search(rf"^\s+{p}%\s+(\S+)\s*$", out, re.MULTILINE)
    return _ms(found.group(1)) if found else float("nan")


def _ms(text: str) -> float:
    found = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text)
    if found is None:
        return float("nan")
    value, unit = found.groups()
    return float(value) * {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}[unit]


def _seconds(text: str) -> float:
    return _ms(text) / 1000.0


def served(
    threads: int,
    torch_threads: int,
    connections: int,
    duration: int,
    warmup: int,
    max_batch: int,
    out: Path,
    extra_env: dict[str, str],
    rounds: int,
    between: Any,
) -> list[dict[str, Any]]:
    """Serve, then ``rounds`` times: ``between()`` (the direct figure, measured while the
    server idles, so both see the same machine) and a measured run."""
    root = Path(tempfile.mkdtemp(prefix="inferd-vision-bench-"))
    write_repository(root / "models", max_batch)
    write_images(root / "images", 8)
    path = "/v1/models/resnet18/classify"
    script = root / "post.lua"
    script.write_text(_LUA.format(n=8, folder=root / "images", path=path))
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERD_")}
    if torch_threads > 0:
        env.update(
            INFERD_TORCH_THREADS=str(torch_threads),
            # Batches side by side, one torch thread each: a thread preempted by HTTP or
            # decoding then delays its own batch only, not a barrier every thread waits at.
            INFERD_BATCH_CONCURRENCY=str(max(1, threads // torch_threads)),
        )
    env.update(
        INFERD_DEVICE="cpu",
        INFERD_ACCESS_LOG="false",
        INFERD_WORKERS="0",
        INFERD_DATA_DIR=str(root / "data"),
    )
    env.update(extra_env)
    log = (out / "inferd-vision.log").open("wb")
    cmd = [str(BIN / "inferd"), "serve", "--host", HOST, "--port", str(port)]
    proc = subprocess.Popen(
        [*cmd, "--models-dir", str(root / "models")], env=env, stdout=log, stderr=subprocess.STDOUT
    )
    try:
        wait_ready(port, proc)
        url = f"http://{HOST}:{port}"
        if warmup:
            cmd = ["wrk", "-t1", f"-c{connections}", f"-d{warmup}s", "-s", str(script), url]
            subprocess.run(cmd, capture_output=True, check=True)
        results = []
        for _ in range(rounds):
            direct_rate = between()
            before = _metrics(url)
            result = wrk(url, script, connections, duration)
            after = _metrics(url)
            batches = after["count"] - before["count"]
            result["mean_batch"] = (after["rows"] - before["rows"]) / batches if batches else 0.0
            seconds = after["seconds"] - before["seconds"]
            result["mean_batch_ms"] = 1000.0 * seconds / batches if batches else 0.0
            result["direct_images_per_s"] = direct_rate
            results.append(result)
            print(
                f"served, {connections} connections: {result['images_per_s']:.1f} images/s, "
                f"p50 {result['p50_ms']:.0f} ms, p99 {result['p99_ms']:.0f} ms, non-2xx "
                f"{result['non_2xx']}, mean batch {result['mean_batch']:.1f} images in "
                f"{result['mean_batch_ms']:.0f} ms; direct just before {direct_rate:.1f} "
                f"images/s: {100 * result['images_per_s'] / direct_rate:.0f} %",
                flush=True,
            )
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
    return results


def _metrics(url: str) -> dict[str, float]:
    """The benchmark model's batch counters (rows, batches, model seconds)."""
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        text = r.read().decode()
    labels = r'\{model="resnet18",version="1"\} (\S+)'

    def value(name: str) -> float:
        found = re.search(name + labels, text)
        return float(found.group(1)) if found else 0.0

    return {
        "rows": value("inference_batch_size_sum"),
        "count": value("inference_batch_size_count"),
        "seconds": value("inference_batch_latency_seconds_sum"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-sizes", default="1,4,8,16,32")
    parser.add_argument("--duration", type=int, default=20, help="seconds per measurement")
    parser.add_argument("--warmup", type=int, default=5, help="seconds of load before serving")
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument(
        "--torch-threads",
        type=int,
        default=0,
        help="the server's torch threads per batch, with threads/torch-threads batches at once; "
        "0 (default): the server's own choice for a torch model on this CPU",
    )
    parser.add_argument("--max-batch", type=int, default=16, help="the server's max_batch_size")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "vision")
    parser.add_argument("--rounds", type=int, default=3, help="direct/served pairs")
    parser.add_argument(
        "--server-env", action="append", default=[], help="KEY=VALUE for the server (repeatable)"
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    model = Direct()
    report: dict[str, Any] = {"threads": args.threads, "cpus": os.cpu_count()}
    table = sweep(model, sizes, args.duration, args.threads)
    report["direct"] = {_name(k): v for k, v in table.items()}
    # The best batch size of each layout, measured again before each served run: on a shared
    # machine the load changes by the minute, so each served figure is set against a direct
    # one taken just before it.
    best = [
        max((k for k in table if k[:2] == layout), key=lambda k: table[k])
        for layout in dict.fromkeys(k[:2] for k in table)
    ]
    report["best_direct"] = [_name(b) for b in best]
    print(f"measured again before each served run: {', '.join(map(_name, best))}", flush=True)

    def limit() -> float:
        return max(model.measure(*config, args.duration) for config in best)

    extra = dict(item.split("=", 1) for item in args.server_env)
    report["server_env"] = extra
    runs = served(
        args.threads,
        args.torch_threads,
        args.connections,
        args.duration,
        args.warmup,
        args.max_batch,
        args.out,
        extra,
        args.rounds,
        limit,
    )
    report["served"] = runs
    shares = sorted(r["images_per_s"] / r["direct_images_per_s"] for r in runs)
    report["share_median"] = shares[len(shares) // 2]
    print(f"served / direct: median {100 * report['share_median']:.0f} % over {len(runs)} rounds")
    (args.out / "vision.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
