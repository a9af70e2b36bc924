"""Fair sharing of a model's queue: four keys at 1x, alone and beside one key at 10x.

    python bench/fairness.py [--light-rate 40] [--heavy-multiple 10] [--duration 10]
                             [--batch-ms 20] [--max-batch 8] [--queue 64] [--json FILE]

One ``inferd serve`` (CPU 0, keys required) serves ``fixed``, a model whose every batch takes
``--batch-ms`` whatever its size (a GPU-like cost: ``--max-batch`` rows per batch, so
``max-batch / batch-ms`` rows a second at most). Five keys are made with ``inferd keys create``.
An open-loop generator (this process, CPU 1: raw HTTP/1.1 on keep-alive connections, a new
connection whenever none is free, latency counted from each request's scheduled send time)
runs three phases of ``--duration`` seconds:

1. ``alone``: the four light keys, ``--light-rate`` requests a second each;
2. ``fair``: the same, plus the heavy key at ``--heavy-multiple`` times that rate, with fair
   sharing on (the default);
3. ``one queue``: phase 2 again on a server started with ``INFERD_FAIR_SHARING=false``, what
   the queue did before: one lane in arrival order.

With the defaults the five keys ask for 560 rows a second of a model that serves 400: the heavy
key alone asks for its whole capacity. The figure: each light key's p99 in phase 2 against its
p99 in phase 1 (the goal: at most 2x), and that none of its requests fails.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

HOST = "127.0.0.1"
BODY = b'{"features": [5.1, 3.5, 1.4, 0.2]}'
LIGHT = ("light1", "light2", "light3", "light4")
HEAVY = "heavy"


class FixedTimeModel:
    """A model whose batch takes the same time whatever its size (``behaviour.json``:
    ``batch_ms``); served by the ``python`` runtime."""

    def __init__(self, spec: Any, version: int, path: Path) -> None:
        self.path = path
        self.seconds = 0.0

    def load(self) -> None:
        behaviour = json.loads((self.path / "behaviour.json").read_text())
        self.seconds = float(behaviour["batch_ms"]) / 1000.0

    def predict(self, batch: np.ndarray) -> np.ndarray:
        time.sleep(self.seconds)
        out = np.full((batch.shape[0], 3), 0.1)
        out[:, 0] = 0.8
        return out

    def classes(self) -> list[int | str]:
        return [0, 1, 2]

    def unload(self) -> None:
        pass


def write_model(root: Path, batch_ms: float, max_batch: int, queue: int) -> None:
    folder = root / "fixed"
    (folder / "1").mkdir(parents=True)
    (folder / "model.toml").write_text(
        "\n".join(
            [
                'runtime = "python"',
                'class = "fairness:FixedTimeModel"',
                'description = "every batch takes the same time"',
                "[input]",
                'features = ["a", "b", "c", "d"]',
                "example = [5.1, 3.5, 1.4, 0.2]",
                "[output]",
                'labels = ["a", "b", "c"]',
                "[batching]",
                f"max_batch_size = {max_batch}",
                f"max_queue_size = {queue}",
                "",
            ]
        )
    )
    (folder / "1" / "behaviour.json").write_text(json.dumps({"batch_ms": batch_ms}))


def pin(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and os.cpu_count() != 1 else []


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def environment(work: Path, fair: bool, timeout_ms: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("INFERD_")}
    env.update(
        INFERD_MODELS_DIR=str(work / "models"),
        INFERD_DATA_DIR=str(work / "data"),
        INFERD_AUTH="required",
        INFERD_WORKERS="0",
        INFERD_ACCESS_LOG="false",
        INFERD_DEFAULT_MODEL="fixed",
        INFERD_REQUEST_TIMEOUT_MS=str(timeout_ms),
        INFERD_FAIR_SHARING="true" if fair else "false",
        PYTHONPATH=os.pathsep.join(
            p for p in (str(Path(__file__).resolve().parent), env.get("PYTHONPATH", "")) if p
        ),
    )
    return env


def make_keys(work: Path) -> dict[str, str]:
    env = environment(work, True, 1000)
    keys = {}
    for user in (*LIGHT, HEAVY):
        done = subprocess.run(
            [sys.executable, "-m", "inferd", "keys", "create", "--user", user],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        keys[user] = done.stdout.strip()
    return keys


@contextlib.contextmanager
def server(work: Path, fair: bool, timeout_ms: int) -> Iterator[int]:
    port = free_port()
    cmd = [*pin(0), sys.executable, "-m", "inferd", "serve", "--host", HOST, "--port", str(port)]
    log = (work / f"server-{'fair' if fair else 'fifo'}.log").open("wb")
    proc = subprocess.Popen(
        cmd, env=environment(work, fair, timeout_ms), stdout=log, stderr=subprocess.STDOUT
    )
    try:
        for _ in range(600):
            if proc.poll() is not None:
                raise RuntimeError(f"the server exited; see {log.name}")
            try:
                url = f"http://{HOST}:{port}/health/ready"
                with urllib.request.urlopen(url, timeout=2) as answer:
                    if answer.status == 200:
                        break
            except OSError:
                pass
            time.sleep(0.1)
        else:
            raise RuntimeError("the server did not become ready")
        yield port
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class Client:
    """Keep-alive HTTP/1.1 connections of one key; a new one whenever none is free."""

    def __init__(self, port: int, key: str) -> None:
        self.port = port
        self.request = (
            b"POST /v1/models/fixed/predict HTTP/1.1\r\nHost: bench\r\n"
            b"Authorization: Bearer " + key.encode() + b"\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(BODY) + BODY
        )
        self.idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self.opened = 0

    async def post(self) -> int:
        if self.idle:
            reader, writer = self.idle.pop()
            try:
                return await self._exchange(reader, writer)
            except (OSError, asyncio.IncompleteReadError):
                writer.close()  # closed by the server while idle (keep-alive timeout): anew
        reader, writer = await asyncio.open_connection(HOST, self.port)
        self.opened += 1
        return await self._exchange(reader, writer)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        writer.write(self.request)
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await reader.readexactly(length)
        if b"connection: close" in head.lower():
            writer.close()
        else:
            self.idle.append((reader, writer))
        return status

    def close(self) -> None:
        for _, writer in self.idle:
            writer.close()


async def phase(port: int, keys: dict[str, str], rates: dict[str, float], seconds: float) -> Any:
    """Send each key's requests at its rate for ``seconds``; per key, (due, latency, status)."""
    loop = asyncio.get_running_loop()
    clients = {user: Client(port, keys[user]) for user in rates}
    results: dict[str, list[tuple[float, float, int]]] = {user: [] for user in rates}
    tasks: set[asyncio.Task[None]] = set()

    async def one(user: str, due: float) -> None:
        try:
            status = await clients[user].post()
        except (OSError, asyncio.IncompleteReadError):
            status = 0
        results[user].append((due, loop.time() - due, status))

    start = loop.time() + 0.2
    schedule = sorted(
        (start + i / rate + (n * 0.0013), user)  # keys slightly apart, not in lockstep
        for n, (user, rate) in enumerate(rates.items())
        for i in range(int(rate * seconds))
    )
    for due, user in schedule:
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = loop.create_task(one(user, due))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    for client in clients.values():
        client.close()
    return results, {user: client.opened for user, client in clients.items()}


def summary(rows: list[tuple[float, float, int]]) -> dict[str, Any]:
    latencies = np.array([r[1] for r in rows if r[2] == 200]) * 1000.0
    statuses: dict[str, int] = {}
    for _, _, status in rows:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    return {
        "requests": len(rows),
        "statuses": statuses,
        "p50_ms": float(np.percentile(latencies, 50)) if len(latencies) else None,
        "p99_ms": float(np.percentile(latencies, 99)) if len(latencies) else None,
    }


def run(opts: argparse.Namespace) -> dict[str, Any]:
    light = dict.fromkeys(LIGHT, opts.light_rate)
    loaded = {**light, HEAVY: opts.light_rate * opts.heavy_multiple}
    with tempfile.TemporaryDirectory(prefix="inferd-fairness-") as tmp:
        work = Path(tmp)
        write_model(work / "models", opts.batch_ms, opts.max_batch, opts.queue)
        keys = make_keys(work)
        if shutil.which("taskset") and (os.cpu_count() or 1) > 1:
            os.sched_setaffinity(0, {1})  # the generator beside the server, not on its core
        phases: dict[str, Any] = {}
        for name, fair, rates in (
            ("alone", True, light),
            ("fair", True, loaded),
            ("one queue", False, loaded),
        ):
            with server(work, fair, opts.timeout_ms) as port:
                asyncio.run(phase(port, keys, rates, 1.0))  # warm-up: connections, batches
                results, _ = asyncio.run(phase(port, keys, rates, opts.duration))
            phases[name] = {
                **{user: summary(rows) for user, rows in results.items()},
                "light": summary([row for user in LIGHT for row in results[user]]),
            }
    ratios = {
        user: _ratio(phases["fair"][user]["p99_ms"], phases["alone"][user]["p99_ms"])
        for user in (*LIGHT, "light")
    }
    failed = {
        name: sum(
            count
            for user in LIGHT
            for status, count in phases[name][user]["statuses"].items()
            if status != "200"
        )
        for name in phases
    }
    return {
        "options": vars(opts),
        "capacity_rows_per_s": opts.max_batch / opts.batch_ms * 1000.0,
        "asked_rows_per_s": sum(loaded.values()),
        "phases": phases,
        "p99_fair_over_alone": ratios,
        "light_failures": failed,
        "load_average": os.getloadavg()[0],
    }


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def fmt(value: float | None, digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def report(result: dict[str, Any]) -> str:
    lines = [
        f"capacity {result['capacity_rows_per_s']:.0f} rows/s, asked "
        f"{result['asked_rows_per_s']:.0f} rows/s with the heavy key; "
        f"load average {result['load_average']:.2f}",
        "",
        "| key | phase | requests | not 200 | p50 ms | p99 ms |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for user in (*LIGHT, "light", HEAVY):
        for name, data in result["phases"].items():
            if user not in data:
                continue
            row = data[user]
            bad = sum(n for status, n in row["statuses"].items() if status != "200")
            lines.append(
                f"| {user} | {name} | {row['requests']} | {bad} | {fmt(row['p50_ms'])} | "
                f"{fmt(row['p99_ms'])} |"
            )
    lines.append("")
    ratios = result["p99_fair_over_alone"]
    lines.append(
        "light keys' p99 beside the heavy key / alone: "
        + ", ".join(f"{user} {fmt(ratios[user], 2)}x" for user in (*LIGHT, "light"))
    )
    lines.append(f"light keys' failed requests per phase: {result['light_failures']}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--light-rate", type=float, default=40.0)
    parser.add_argument("--heavy-multiple", type=float, default=10.0)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--batch-ms", type=float, default=20.0)
    parser.add_argument("--max-batch", type=int, default=8)
    parser.add_argument("--queue", type=int, default=64)
    parser.add_argument("--timeout-ms", type=int, default=2000)
    parser.add_argument("--json", type=Path, default=None, help="also write the result here")
    opts = parser.parse_args(argv)
    result = run(opts)
    print(report(result))
    if opts.json is not None:
        opts.json.write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
