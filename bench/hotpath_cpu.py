"""CPU time per request of inferd's HTTP path, in one process, without sockets.

    python bench/hotpath_cpu.py [--connections 50] [--requests 60000] [--repeats 5]
                                [--models-dir DIR] [--path /predict]

The server's own code, as ``inferd serve`` runs it (its uvicorn configuration and connection
protocol, the app with its lifespan, access log and metrics on), is driven by in-memory
connections: each "connection" is a transport whose ``write`` takes the answer and feeds the
connection its next request on the next turn of the loop (closed loop, ``--connections`` of
them). What is measured is the event loop thread's CPU time per answered request
(``time.thread_time``), with none of the system calls a socket costs (reads, writes, epoll)
and none of wrk's: the Python work of a request, which is what a change to inferd's code
changes. It is much steadier than req/s on a shared machine (a repeat's spread is a few per
cent), so a change of a few microseconds shows; the report gives each repeat and the median.

``bench/run.py`` stays the measure of req/s and latency; this one says where a change moved the
CPU cost. Compare two commits by running it once with each (``PYTHONPATH=<other>/src``).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

BIN = Path(sys.executable).parent
BODY = b'{"features": [5.1, 3.5, 1.4, 0.2]}'


class _Pipe(asyncio.Transport):
    """One in-memory connection: ``write`` takes an answer; the next request follows."""

    def __init__(self, bench: _Bench, protocol: Any) -> None:
        super().__init__()
        self.bench = bench
        self.protocol = protocol
        self._closing = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.bench.answered(self, bytes(data))

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 40000), "sockname": ("127.0.0.1", 8000)}.get(
            name, default
        )

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        self._closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0


class _Bench:
    def __init__(self, request: bytes, total: int) -> None:
        self.request = request
        self.left = total
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        self.statuses: dict[bytes, int] = {}

    def answered(self, pipe: _Pipe, data: bytes) -> None:
        status = data[9:12]
        self.statuses[status] = self.statuses.get(status, 0) + 1
        self.left -= 1
        if self.left > 0:
            self.loop.call_soon(pipe.protocol.data_received, self.request)
        elif self.left == 0:
            self.done.set_result(None)


async def _measure(
    protocol_factory: Any, request: bytes, connections: int, count: int
) -> tuple[float, float, dict[bytes, int]]:
    bench = _Bench(request, count)
    pipes = []
    for _ in range(connections):
        protocol = protocol_factory()
        pipe = _Pipe(bench, protocol)
        protocol.connection_made(pipe)
        pipes.append(pipe)
    cpu, wall = time.thread_time(), time.perf_counter()
    for pipe in pipes:
        pipe.protocol.data_received(request)
    await bench.done
    cpu, wall = time.thread_time() - cpu, time.perf_counter() - wall
    await asyncio.sleep(0.05)  # the last answers' tasks end
    for pipe in pipes:
        pipe.protocol.connection_lost(None)
    return cpu / count * 1e6, wall / count * 1e6, bench.statuses


async def _run(args: argparse.Namespace, models_dir: Path, data_dir: Path) -> None:
    from uvicorn.lifespan.on import LifespanOn
    from uvicorn.server import ServerState

    from inferd.app import create_app
    from inferd.logs import configure_logging
    from inferd.server import uvicorn_config
    from inferd.settings import Settings

    settings = Settings(
        models_dir=models_dir,
        data_dir=data_dir,
        access_log=True,
        log_format="json",
        auth="required" if args.auth else "off",
    )
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    config = uvicorn_config(app, settings)
    config.load()
    lifespan = LifespanOn(config)
    await lifespan.startup()
    if lifespan.should_exit:
        raise SystemExit("the app did not start")
    key_header = b""
    if args.auth:  # a key whose rate and daily budget are far above the load: all charged
        key, _ = await app.keys.create("bench", ["predict"], rate="1000000/s", daily_tokens=10**12)
        key_header = b"authorization: Bearer " + key.encode() + b"\r\n"
    state = ServerState()
    loop = asyncio.get_running_loop()

    def factory() -> Any:
        return config.http_protocol_class(
            config=config, server_state=state, app_state={}, _loop=loop
        )

    head = (
        f"POST {args.path} HTTP/1.1\r\nhost: 127.0.0.1:8000\r\n"
        f"content-type: application/json\r\ncontent-length: {len(BODY)}\r\n"
    )
    request = head.encode() + key_header + b"\r\n" + BODY
    deadline = time.monotonic() + 60  # the models load after start-up: warm up until served
    while True:
        _, _, statuses = await _measure(factory, request, args.connections, args.requests // 4)
        if set(statuses) == {b"200"}:
            break
        if time.monotonic() > deadline:
            raise SystemExit(f"the model did not serve: {statuses}")
        await asyncio.sleep(0.5)
    if args.calls:
        await _count_calls(factory, request, args.connections, args.calls)
        await lifespan.shutdown()
        return
    cpus, walls = [], []
    for repeat in range(args.repeats):
        cpu, wall, statuses = await _measure(factory, request, args.connections, args.requests)
        cpus.append(cpu)
        walls.append(wall)
        answers = ", ".join(f"{k.decode()}: {n}" for k, n in sorted(statuses.items()))
        print(
            f"repeat {repeat + 1}: {cpu:6.2f} µs CPU per request ({wall:6.2f} µs wall), {answers}",
            file=sys.stderr,
        )
    print(
        f"connections {args.connections}, {args.requests} requests x {args.repeats}: "
        f"median {statistics.median(cpus):.2f} µs CPU per request "
        f"(min {min(cpus):.2f}, max {max(cpus):.2f})",
        file=sys.stderr,
    )
    await lifespan.shutdown()


async def _count_calls(factory: Any, request: bytes, connections: int, count: int) -> None:
    """Count the function calls (Python and C) the event loop's thread makes for ``count``
    requests; print the total and the most frequent, per request."""
    calls: Counter[tuple[str, str]] = Counter()

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call":
            code = frame.f_code
            where = code.co_filename.rsplit("site-packages/", 1)[-1].rsplit("src/", 1)[-1]
            calls[(where, code.co_qualname)] += 1
        elif event == "c_call":  # named with its caller
            code = frame.f_code
            where = code.co_filename.rsplit("site-packages/", 1)[-1].rsplit("src/", 1)[-1]
            caller = f"{where}: {code.co_qualname}"
            calls[(f"(C) {getattr(arg, '__qualname__', repr(arg))}", f"from {caller}")] += 1

    sys.setprofile(profile)
    try:
        await _measure(factory, request, connections, count)
    finally:
        sys.setprofile(None)
    total = sum(calls.values())
    print(f"{total / count:.1f} calls per request ({connections} connections)", file=sys.stderr)
    for (where, name), n in calls.most_common(150):
        print(f"{n / count:7.2f}  {where}: {name}", file=sys.stderr)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=50)
    p.add_argument("--requests", type=int, default=60_000)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--path", default="/predict")
    p.add_argument(
        "--auth",
        action="store_true",
        help="API keys required, the requests sent with a key that has a rate and a budget",
    )
    p.add_argument(
        "--calls",
        type=int,
        default=0,
        help="instead of timing, count the function calls of this many requests",
    )
    p.add_argument(
        "--models-dir", type=Path, help="the demo models (default: trained in a temp dir)"
    )
    args = p.parse_args()
    import uvloop

    with tempfile.TemporaryDirectory(prefix="inferd-hotpath-") as scratch:
        models_dir = args.models_dir or Path(scratch) / "models"
        if not (models_dir / "iris").is_dir():
            subprocess.run(
                [str(BIN / "inferd"), "models", "train-demo", "--models-dir", str(models_dir)],
                check=True,
                capture_output=True,
            )
        # The access lines go nowhere: their formatting is measured, not the terminal.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)
        uvloop.run(_run(args, models_dir, Path(scratch) / "data"))


if __name__ == "__main__":
    main()
