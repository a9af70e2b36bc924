"""A coarse guard of the service-level target: p95 under 50 ms at 50 concurrent users, no 5xx.

Not the benchmark (``bench/`` is): a short closed-loop run against a real server process, with
a small keep-alive HTTP/1.1 client so that the client's own overhead stays out of the figures.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

BODY = b'{"features": [5.1, 3.5, 1.4, 0.2]}'
USERS = 50
SECONDS = 3.0


async def user(port: int, until: float, latencies: list[float], statuses: list[int]) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (
        b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
    )
    try:
        while time.perf_counter() < until:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":", 1)[1])
            await reader.readexactly(length)
            latencies.append(time.perf_counter() - started)
            statuses.append(int(head.split(b" ", 2)[1]))
    finally:
        writer.close()


def test_p95_under_50ms_at_50_users(start_server: Any, models_dir: Path) -> None:
    server = start_server(["--models-dir", str(models_dir)])
    server.wait_ready()
    latencies: list[float] = []
    statuses: list[int] = []

    async def load() -> None:
        until = time.perf_counter() + SECONDS
        await asyncio.gather(*(user(server.port, until, latencies, statuses) for _ in range(USERS)))

    asyncio.run(load())
    latencies.sort()
    p95 = latencies[int(len(latencies) * 0.95)]
    assert len(latencies) > USERS * 10
    assert [s for s in statuses if s >= 500] == []
    assert p95 < 0.050, f"p95 {p95 * 1000:.1f} ms over {len(latencies)} requests"
