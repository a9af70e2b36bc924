"""``inferd serve --processes 2``: one server of two processes on one port.

Every request here goes on a connection of its own, so that the kernel hands them to either
process; what a test checks must then hold whichever process answered.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx

from tests.e2e.conftest import run_cli
from tests.support.models import write_scripted_model

SETOSA = {"features": [5.1, 3.5, 1.4, 0.2]}


def fresh(method: str, url: str, **kwargs: Any) -> httpx.Response:
    """One request on a new connection (``httpx.request`` opens and closes one)."""
    kwargs.setdefault("timeout", 30)
    return httpx.request(method, url, **kwargs)


def sample(text: str, line: str) -> float:
    match = re.search(rf"^{re.escape(line)} (\S+)$", text, re.MULTILINE)
    assert match is not None, f"{line} not in the metrics"
    return float(match.group(1))


def processes(server: Any) -> list[int]:
    """The supervisor's children (the server and limiter processes)."""
    path = Path(f"/proc/{server.proc.pid}/task/{server.proc.pid}/children")
    return sorted(int(pid) for pid in path.read_text().split())


def start(start_server: Any, tmp_path: Path, config: str, *args: str) -> Any:
    path = tmp_path / "inferd.toml"
    path.write_text(config + "gc_freeze = false\nrequest_timeout_ms = 10000\n")
    server = start_server(["--config", str(path), "--processes", "2", *args])
    server.wait_ready(timeout=90)
    return server


def test_metrics_readiness_and_model_swaps_speak_for_both_processes(
    start_server: Any, models_dir: Path, tmp_path: Path
) -> None:
    # The embedded SQLite store and in-process workers (2 per process) by default.
    server = start(start_server, tmp_path, f'models_dir = "{models_dir}"\nmodels = ["iris"]\n')
    ready = fresh("GET", server.url + "/health/ready").json()
    assert ready["status"] == "ready"
    assert [p["status"] for p in ready["processes"]] == ["ready", "ready"]
    assert len(processes(server)) == 3  # two server processes and the limiter

    with ThreadPoolExecutor(8) as pool:
        answers = list(
            pool.map(lambda _: fresh("POST", server.url + "/predict", json=SETOSA), range(40))
        )
    assert [a.status_code for a in answers] == [200] * 40
    for _ in range(6):  # whichever process takes the scrape, it counts both processes' requests
        text = fresh("GET", server.url + "/metrics").text
        count = 'inference_request_latency_seconds_count{model="iris",version="1"}'
        assert sample(text, count) == 40
        assert sample(text, "inference_server_processes") == 2
        assert sample(text, "inference_server_processes_reporting") == 2
        assert sample(text, 'inference_model_ready{model="iris",version="1"}') == 1

    stats = fresh("GET", server.url + "/v1/stats?window=60").json()  # the console's numbers
    assert stats["processes"] == {"total": 2, "reporting": 2}
    assert stats["models"]["iris"]["requests_total"] == 40

    # Long-running requests: both processes submit to and run from the one SQLite file.
    job = {"model": "iris", "input": SETOSA}
    with ThreadPoolExecutor(8) as pool:
        ids = list(
            pool.map(lambda _: fresh("POST", server.url + "/v1/requests", json=job).json()["id"],
                     range(20))
        )  # fmt: skip
    end = time.monotonic() + 30
    statuses: list[str] = []
    while time.monotonic() < end:
        statuses = [fresh("GET", f"{server.url}/v1/requests/{i}").json()["status"] for i in ids]
        if set(statuses) <= {"succeeded", "failed", "dead"}:
            break
        time.sleep(0.2)
    assert statuses == ["succeeded"] * 20

    # A corrupt version is refused by both; the old one serves on.
    v2 = models_dir / "iris" / "2"
    v2.mkdir()
    (v2 / "model.joblib").write_bytes(b"\x80\x04 not a model")
    refused = run_cli("models", "load", "iris", "--url", server.url, cwd=tmp_path)
    assert refused.returncode == 2, refused.stdout
    assert "iris/2/model.joblib" in refused.stderr
    # A good version 2 reaches both processes before the command returns...
    shutil.copy(models_dir / "iris" / "1" / "model.joblib", v2 / "model.joblib")
    loaded = run_cli("models", "load", "iris", "--url", server.url, cwd=tmp_path)
    assert loaded.returncode == 0, loaded.stderr
    versions = {fresh("POST", server.url + "/predict", json=SETOSA).json()["model_version"]
                for _ in range(20)}  # fmt: skip
    assert versions == {"2"}
    # ... and so does a rollback.
    rolled = run_cli("models", "rollback", "iris", "1", "--url", server.url, cwd=tmp_path)
    assert rolled.returncode == 0, rolled.stderr
    versions = {fresh("POST", server.url + "/predict", json=SETOSA).json()["model_version"]
                for _ in range(20)}  # fmt: skip
    assert versions == {"1"}
    text = fresh("GET", server.url + "/metrics").text
    assert sample(text, 'inference_model_ready{model="iris",version="2"}') == 1

    # A process that dies is started again; meanwhile the server says it is not ready.
    victim = fresh("GET", server.url + "/health/ready").json()["processes"][1]["pid"]
    os.kill(victim, signal.SIGKILL)
    seen_not_ready = False
    end = time.monotonic() + 60
    while time.monotonic() < end:
        answer = fresh("GET", server.url + "/health/ready")
        if answer.status_code == 503:
            seen_not_ready = True
        elif seen_not_ready:
            break
        time.sleep(0.05)
    assert seen_not_ready
    assert answer.status_code == 200, answer.text
    assert victim not in processes(server)
    assert len(processes(server)) == 3
    assert server.stop() == 0


def test_limits_hold_for_the_whole_server(
    start_server: Any, models_dir: Path, tmp_path: Path
) -> None:
    config = (
        f'models_dir = "{models_dir}"\nworkers = 0\nauth = "required"\nmodels = ["iris"]\n'
        f'database_url = "sqlite+aiosqlite:///{tmp_path}/shared.db"\n'
    )
    (tmp_path / "keys.toml").write_text(config)
    created = run_cli(
        "keys", "create", "--user", "u", "--scopes", "predict", "--rate", "20/h",
        "--daily-tokens", "15", "--config", str(tmp_path / "keys.toml"), cwd=tmp_path,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    key = {"Authorization": f"Bearer {created.stdout.strip()}"}
    server = start(start_server, tmp_path, config)

    def predict(_: int) -> str:
        answer = fresh("POST", server.url + "/predict", json=SETOSA, headers=key)
        return "ok" if answer.status_code == 200 else answer.json()["error"]["code"]

    with ThreadPoolExecutor(8) as pool:
        codes = list(pool.map(predict, range(40)))
    # One rate and one budget for the key, not one per process (that would be 30 answers):
    # 20 requests within the rate, of which 15 within the budget.
    assert codes.count("ok") == 15, codes
    assert codes.count("quota_exceeded") == 5, codes
    assert codes.count("rate_limited") == 20, codes
    usage = fresh("GET", server.url + "/v1/usage", headers=key)
    assert usage.json()["tokens_used_today"] == 15, usage.text


def test_sigterm_drains_every_process(start_server: Any, models_dir: Path, tmp_path: Path) -> None:
    write_scripted_model(models_dir, "slow", batching={"max_batch_size": 1}, delay_s=0.5)
    server = start(
        start_server, tmp_path, f'models_dir = "{models_dir}"\nworkers = 0\nmodels = ["slow"]\n'
    )
    url = server.url + "/v1/models/slow/predict"
    results: list[int | str] = []
    lock = threading.Lock()

    def call(i: int) -> None:
        try:
            code: int | str = fresh("POST", url, json={"features": [i, 0, 0, 0]}).status_code
        except httpx.HTTPError as exc:
            code = repr(exc)
        with lock:
            results.append(code)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for thread in threads:
        thread.start()
    time.sleep(0.6)  # every request is in: one running per process, the rest queued
    server.proc.send_signal(signal.SIGTERM)
    for thread in threads:
        thread.join(30)
    assert server.proc.wait(30) == 0
    assert results == [200] * 6
    try:
        fresh("GET", server.url + "/health/live", timeout=2)
    except httpx.ConnectError:
        pass
    else:
        raise AssertionError("the port still answers after the drain")
    assert "stopping: draining every process" in server.output()


def test_a_model_that_fails_to_load_stops_every_process(
    start_server: Any, models_dir: Path, tmp_path: Path
) -> None:
    (models_dir / "iris" / "1" / "model.joblib").write_bytes(b"\x80\x04 not a model")
    path = tmp_path / "inferd.toml"
    path.write_text(f'models_dir = "{models_dir}"\nmodels = ["iris"]\nworkers = 0\n')
    server = start_server(["--config", str(path), "--processes", "2"])
    assert server.proc.wait(60) == 1
    output = server.output()
    assert "iris/1/model.joblib" in output
    assert "a server process failed; stopping" in output
