"""Versions change under continuous load on a real server, through the ``inferd models`` CLI.

50 connections keep predicting while a corrupt version 2 is refused, a good version 2 is loaded
and then rolled back. No request may fail, and the answers must come from the version that is
the default once each command has returned.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import run_cli

SETOSA = {"features": [5.1, 3.5, 1.4, 0.2]}
CONNECTIONS = 50


@dataclass
class Tally:
    """What the load generator saw: when each answer was asked for and received, and from
    which version; every failure."""

    answers: list[tuple[float, float, str]] = field(default_factory=list)
    failures: list[tuple[float, str]] = field(default_factory=list)

    @property
    def sent(self) -> int:
        return len(self.answers) + len(self.failures)

    def versions(self, sent_after: float, received_before: float = float("inf")) -> set[str]:
        """Versions that answered requests sent after a moment (so the server got them after
        it) and answered before another (so the server handled them before it)."""
        return {v for sent, got, v in self.answers if sent > sent_after and got < received_before}


class Load:
    """``CONNECTIONS`` clients in closed loops, half on ``/predict``, half on the named route."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.tally = Tally()
        self._stop = asyncio.Event()
        self._task: asyncio.Task[Any] | None = None

    async def __aenter__(self) -> Load:
        self._task = asyncio.ensure_future(self._run())
        await asyncio.sleep(0.5)  # every connection open and busy
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        assert self._task is not None
        await self._task

    async def _run(self) -> None:
        limits = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=CONNECTIONS)
        async with httpx.AsyncClient(base_url=self.url, limits=limits, timeout=30) as client:
            await asyncio.gather(*(self._client(client, i) for i in range(CONNECTIONS)))

    async def _client(self, client: httpx.AsyncClient, i: int) -> None:
        path = "/predict" if i % 2 else "/v1/models/iris/predict"
        while not self._stop.is_set():
            sent = time.monotonic()
            try:
                r = await client.post(path, json=SETOSA)
            except httpx.HTTPError as exc:
                self.tally.failures.append((sent, f"{path}: {exc!r}"))
                continue
            if r.status_code != 200:
                self.tally.failures.append((sent, f"{path}: {r.status_code} {r.text}"))
                continue
            body = r.json()
            assert body["prediction"] == 0
            self.tally.answers.append((sent, time.monotonic(), body["model_version"]))


async def cli(*args: str, cwd: Path) -> Any:
    """An ``inferd`` command in a thread, so the load goes on meanwhile."""
    return await asyncio.to_thread(run_cli, *args, cwd=cwd)


def start(start_server: Any, models_dir: Path, tmp_path: Path) -> Any:
    # A deadline far above the default: this test is about swaps, not latency, and the load
    # generator shares two cores with the server.
    config = tmp_path / "inferd.toml"
    config.write_text(f'models_dir = "{models_dir}"\nrequest_timeout_ms = 5000\n')
    server = start_server(["--config", str(config)])
    server.wait_ready()
    return server


def report(tally: Tally, phases: dict[str, tuple[float, float]]) -> None:
    """Requests answered (by version) and failed in each phase (in the -s output)."""
    for what, (begin, end) in phases.items():
        answers = [v for _, got, v in tally.answers if begin <= got < end]
        failed = sum(1 for sent, _ in tally.failures if begin <= sent < end)
        by_version = {v: answers.count(v) for v in sorted(set(answers))}
        print(f"\n{what}: {len(answers) + failed} sent, {failed} failed, by version {by_version}")


async def test_versions_change_under_load_without_losing_a_request(
    start_server: Any, models_dir: Path, tmp_path: Path
) -> None:
    server = start(start_server, models_dir, tmp_path)
    url = ["--url", server.url]
    v2 = models_dir / "iris" / "2"
    async with Load(server.url) as load:
        began = time.monotonic()
        # A corrupt version 2 is refused with its reason; version 1 serves on.
        v2.mkdir()
        (v2 / "model.joblib").write_bytes(b"\x80\x04 not a model")
        refused = await cli("models", "load", "iris", *url, cwd=tmp_path)
        refused_at = time.monotonic()
        await asyncio.sleep(0.5)
        # A good version 2 takes over.
        fixing_at = time.monotonic()
        shutil.copy(models_dir / "iris" / "1" / "model.joblib", v2 / "model.joblib")
        loaded = await cli("models", "load", "iris", *url, cwd=tmp_path)
        swapped_at = time.monotonic()
        await asyncio.sleep(0.7)
        # And is rolled back.
        rolling_at = time.monotonic()
        rolled = await cli("models", "rollback", "iris", "1", *url, cwd=tmp_path)
        rolled_at = time.monotonic()
        await asyncio.sleep(0.5)
        ended = time.monotonic()
    tally = load.tally
    report(
        tally,
        {
            "corrupt version 2 refused": (began, fixing_at),
            "swap 1 -> 2": (fixing_at, rolling_at),
            "rollback 2 -> 1": (rolling_at, ended),
            "in all": (0.0, ended),
        },
    )

    assert refused.returncode == 2
    assert "iris/2/model.joblib" in refused.stderr
    assert loaded.returncode == 0, loaded.stderr
    assert "default version 2" in loaded.stdout
    assert rolled.returncode == 0, rolled.stderr
    assert "default version 2 → 1" in rolled.stdout
    assert tally.failures == []
    assert tally.sent > 200
    # The machine is shared and the client's event loop is busy: a request may reach the server
    # well after it was started, so bound it on both sides.
    assert tally.versions(sent_after=0.0, received_before=fixing_at) == {"1"}
    assert tally.versions(sent_after=swapped_at, received_before=rolling_at) == {"2"}
    assert tally.versions(sent_after=rolled_at) == {"1"}
    assert refused_at < fixing_at

    index = await cli("models", "index", *url, cwd=tmp_path)
    assert index.returncode == 0, index.stderr
    assert index.stdout.count("READY") == 3  # iris 1 and 2, iris-forest 1
    async with httpx.AsyncClient() as client:
        metrics = (await client.get(server.url + "/metrics")).text
    assert 'inference_model_load_failures_total{model="iris",version="2"} 1.0' in metrics
    assert 'inference_model_ready{model="iris",version="1"} 1.0' in metrics
    assert 'inference_model_ready{model="iris",version="2"} 1.0' in metrics
    server.stop()
    events = [json.loads(line) for line in server.output().splitlines() if line.startswith("{")]
    iris = [e for e in events if e.get("model") == "iris" and e["event"].startswith("model ")]
    assert [(e["event"], e.get("from_version"), e.get("to_version")) for e in iris] == [
        ("model load", None, 1),
        ("model swap", None, 1),
        ("model load failed", None, None),
        ("model load", None, 2),
        ("model swap", 1, 2),
        ("model unload", 1, None),
        ("model load", None, 1),
        ("model swap", 2, 1),
    ]
    assert all(isinstance(e["ms"], float) for e in iris)
