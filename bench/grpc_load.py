"""gRPC against REST on one server: the Open Inference Protocol's ``ModelInfer`` over gRPC,
V2 ``infer`` over REST (JSON and binary tensors) and ``/v1/models/{m}/predict``, one row each.

    python bench/grpc_load.py [--concurrency 32] [--duration 5] [--warmup 1] [--rounds 2]
                              [--models-dir DIR] [--out FILE.json]

One ``inferd serve --grpc-port`` (demo models, access log on) on one CPU; the load from one
Python process on another: ``--concurrency`` calls kept in flight (a closed loop). gRPC calls
go through ``grpc.aio`` on one channel (HTTP/2, the calls multiplexed); REST requests go
through a minimal asyncio HTTP/1.1 client on ``--concurrency`` keep-alive connections, so the
REST figures are not held back by a slow client library. Both clients are Python: the figures
compare the server's protocols on this machine, not its ceiling (bench/run.py with wrk gives
that for REST).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

HOST = "127.0.0.1"
BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parent.parent
ROW = [5.1, 3.5, 1.4, 0.2]
MODEL = "iris"
V1_BODY = json.dumps({"features": ROW}).encode()
V2_BODY = json.dumps(
    {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64", "data": ROW}]}
).encode()
PROTOCOLS = ("grpc", "rest-v2-json", "rest-v2-binary", "rest-v1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def pinned(cpu: int | None, cmd: list[str]) -> list[str]:
    return ["taskset", "-c", str(cpu), *cmd] if cpu is not None else cmd


@contextlib.contextmanager
def serve(models_dir: Path, cpu: int | None, log: Path) -> Iterator[tuple[int, int]]:
    port, grpc_port = free_port(), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERD_")}
    env["INFERD_ACCESS_LOG"] = "true"
    cmd = [str(BIN / "inferd"), "serve", "--host", HOST, "--port", str(port)]
    cmd += ["--grpc-port", str(grpc_port), "--models-dir", str(models_dir), "--workers", "0"]
    cmd += ["--log-format", "json"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            pinned(cpu, cmd), stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
        try:
            deadline = time.monotonic() + 90
            while True:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the server did not come up; see {log}")
                try:
                    with urllib.request.urlopen(f"http://{HOST}:{port}/health/ready", timeout=1):
                        break
                except OSError:
                    time.sleep(0.2)
            yield port, grpc_port
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


# --------------------------------------------------------------------------- clients
Call = Callable[[], Awaitable[None]]


async def grpc_calls(grpc_port: int, concurrency: int) -> tuple[list[Call], Callable[[], Any]]:
    import grpc

    from inferd.grpc import grpc_predict_v2_pb2 as pb

    channel = grpc.aio.insecure_channel(f"{HOST}:{grpc_port}")
    infer = channel.unary_unary(
        "/inference.GRPCInferenceService/ModelInfer",
        request_serializer=pb.ModelInferRequest.SerializeToString,
        response_deserializer=pb.ModelInferResponse.FromString,
    )
    request = pb.ModelInferRequest(model_name=MODEL)
    request.inputs.add(name="input", datatype="FP64", shape=[1, 4])
    request.raw_input_contents.append(struct.pack("<4d", *ROW))  # one row, little-endian FP64

    async def call() -> None:
        await infer(request, timeout=5)

    return [call] * concurrency, channel.close


async def http_calls(
    port: int, path: str, body: bytes, headers: dict[str, str], concurrency: int
) -> tuple[list[Call], Callable[[], Any]]:
    head = f"POST {path} HTTP/1.1\r\nHost: {HOST}:{port}\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    request = head.encode() + b"\r\n" + body
    connections = [await asyncio.open_connection(HOST, port) for _ in range(concurrency)]

    def caller(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> Call:
        async def call() -> None:
            writer.write(request)
            status_and_headers = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in status_and_headers.split(b"\r\n"):
                if line[:15].lower() == b"content-length:":
                    length = int(line[15:])
            await reader.readexactly(length)  # the body, read even for an error
            if not status_and_headers.startswith(b"HTTP/1.1 200"):
                raise RuntimeError(status_and_headers.split(b"\r\n", 1)[0].decode())

        return call

    def close() -> None:
        for _, writer in connections:
            writer.close()

    return [caller(r, w) for r, w in connections], close


async def load(calls: list[Call], seconds: float) -> dict[str, Any]:
    """Keep every call slot busy for ``seconds``; req/s and latency percentiles."""
    latencies: list[float] = []
    errors = 0
    end = time.perf_counter() + seconds

    async def slot(call: Call) -> None:
        nonlocal errors
        while (now := time.perf_counter()) < end:
            try:
                await call()
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - now)

    started = time.perf_counter()
    await asyncio.gather(*(slot(c) for c in calls))
    wall = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1e3 if latencies else 0

    return {
        "requests": len(latencies),
        "errors": errors,
        "rps": len(latencies) / wall,
        "p50_ms": pct(0.50),
        "p99_ms": pct(0.99),
    }


async def bench(protocol: str, port: int, grpc_port: int, opts: argparse.Namespace) -> Any:
    binary_header = json.dumps(
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
    ).encode()
    if protocol == "grpc":
        calls, close = await grpc_calls(grpc_port, opts.concurrency)
    elif protocol == "rest-v2-json":
        calls, close = await http_calls(
            port, f"/v2/models/{MODEL}/infer", V2_BODY, {}, opts.concurrency
        )
    elif protocol == "rest-v2-binary":
        body = binary_header + struct.pack("<4d", *ROW)
        headers = {"Inference-Header-Content-Length": str(len(binary_header))}
        calls, close = await http_calls(
            port, f"/v2/models/{MODEL}/infer", body, headers, opts.concurrency
        )
    else:
        headers = {"Content-Type": "application/json"}
        calls, close = await http_calls(
            port, f"/v1/models/{MODEL}/predict", V1_BODY, headers, opts.concurrency
        )
    try:
        if opts.warmup:
            await load(calls, opts.warmup)
        return await load(calls, opts.duration)
    finally:
        result = close()
        if asyncio.iscoroutine(result):
            await result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--duration", type=float, default=5.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--rounds", type=int, default=2, help="the protocols in turn, this many times")
    p.add_argument("--models-dir", type=Path)
    p.add_argument("--out", type=Path, help="write the results as JSON here too")
    opts = p.parse_args(argv)
    allowed = sorted(os.sched_getaffinity(0))
    pin = shutil.which("taskset") is not None and len(allowed) >= 2
    server_cpu, client_cpu = (allowed[0], allowed[1]) if pin else (None, None)
    if client_cpu is not None:
        os.sched_setaffinity(0, {client_cpu})
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="inferd-grpc-bench-") as scratch:
        models_dir = opts.models_dir or Path(scratch) / "models"
        if not (models_dir / MODEL).is_dir():
            cmd = [str(BIN / "inferd"), "models", "train-demo", "--models-dir", str(models_dir)]
            subprocess.run(cmd, check=True, capture_output=True, timeout=300)
        with serve(models_dir, server_cpu, Path(scratch) / "server.log") as (port, grpc_port):
            for round_ in range(1, opts.rounds + 1):
                for protocol in PROTOCOLS:
                    run = asyncio.run(bench(protocol, port, grpc_port, opts))
                    run.update(protocol=protocol, round=round_)
                    results.append(run)
                    print(
                        f"round {round_} {protocol:15s} {run['rps']:8,.0f} req/s  "
                        f"p50 {run['p50_ms']:6.2f} ms  p99 {run['p99_ms']:6.2f} ms  "
                        f"errors {run['errors']}",
                        file=sys.stderr,
                        flush=True,
                    )
    print(report(results, opts, pin))
    if opts.out:
        opts.out.write_text(json.dumps({"runs": results, "settings": vars(opts)}, default=str))
    return 0


def report(results: list[dict[str, Any]], opts: argparse.Namespace, pin: bool) -> str:
    where = "server and client on separate CPUs" if pin else "not pinned"
    lines = [
        f"{opts.concurrency} calls in flight, {opts.duration:g} s per run, {where}, load "
        f"average {os.getloadavg()[0]:.2f} at the end.",
        "",
        "| round | protocol | req/s | p50 ms | p99 ms | errors | req/s vs rest-v1 |",
        "|--:|---|--:|--:|--:|--:|--:|",
    ]
    for r in results:
        base = next(x for x in results if x["round"] == r["round"] and x["protocol"] == "rest-v1")
        share = r["rps"] / base["rps"] if base["rps"] else 0.0
        lines.append(
            f"| {r['round']} | {r['protocol']} | {r['rps']:,.0f} | {r['p50_ms']:.2f} "
            f"| {r['p99_ms']:.2f} | {r['errors']} | {share:.0%} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))  # this checkout's generated gRPC modules
    sys.exit(main())
