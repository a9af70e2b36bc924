"""``inferd.client`` and ``inferd predict`` / ``inferd requests`` against real ``inferd serve``
processes: predictions, errors, long-running requests, paging, cancel, auth, retries on 503
and 429, event streams resumed after the connection drops, and (where the server has those
routes) V2 inference and image classification."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

import inferd.http
from inferd.client import (
    AsyncClient,
    BadRequest,
    Client,
    Conflict,
    DoneEvent,
    ErrorEvent,
    Event,
    Forbidden,
    ModelNotReady,
    NotFound,
    RateLimited,
    RequestFailed,
    ResponseEvent,
    RetryPolicy,
    StatusEvent,
    Unauthorized,
    ValidationError,
)
from tests.e2e.conftest import INFERD, Server, env, free_port
from tests.support.models import write_scripted_model, write_streaming_model

SETOSA = [5.1, 3.5, 1.4, 0.2]
VIRGINICA = [6.7, 3.0, 5.2, 2.3]


def _route_module(name: str) -> bool:
    return (Path(inferd.http.__file__).parent / name).is_file()


def _config(path: Path, **settings: Any) -> Path:
    lines = []
    for key, value in settings.items():
        text = str(value).lower() if isinstance(value, bool) else json.dumps(value)
        lines.append(f"{key} = {text}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_models: Path) -> Iterator[Server]:
    """One server for the module: the demo models and a streaming model (50 ms a chunk)."""
    root = tmp_path_factory.mktemp("client")
    models = root / "models"
    shutil.copytree(demo_models, models)
    write_streaming_model(models, chunk_delay_s=0.05)
    if _route_module("vision_api.py"):
        from tests.support.images import write_brightness_model

        write_brightness_model(models)
    config = _config(root / "inferd.toml", models_dir=str(models), sse_retry_ms=50)
    started = Server(["--config", str(config)], root)
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop(signal.SIGKILL)


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client(server.url) as c:
        yield c


# ---------------------------------------------------------------- predictions


def test_predict_and_predict_batch(client: Client) -> None:
    default = client.predict(SETOSA, request_id="client-1")
    assert (default.prediction, default.model_version, default.request_id) == (0, "1", "client-1")
    named = client.predict(np.array(VIRGINICA), model="iris")
    assert (named.model, named.label, named.prediction) == ("iris", "virginica", 2)
    assert named.probabilities is not None and len(named.probabilities) == 3
    rows = client.predict_batch(np.array([SETOSA, VIRGINICA]), model="iris-forest")
    assert [(r.model, r.label) for r in rows] == [
        ("iris-forest", "setosa"),
        ("iris-forest", "virginica"),
    ]
    # Without a model, a batch goes to the server's default model.
    assert [r.model for r in client.predict_batch([SETOSA])] == ["iris"]
    # A version of a model; without a model, a version of the default one.
    pinned = client.predict(SETOSA, model="iris-forest", version=1)
    assert (pinned.model, pinned.model_version, pinned.label) == ("iris-forest", "1", "setosa")
    assert client.predict(SETOSA, version="1").model == "iris"
    assert [r.model_version for r in client.predict_batch([SETOSA], "iris", 1)] == ["1"]
    with pytest.raises(NotFound):
        client.predict(SETOSA, model="iris", version=7)


def test_server_errors_become_typed_exceptions(client: Client) -> None:
    with pytest.raises(NotFound) as missing:
        client.predict(SETOSA, model="no-such-model")
    assert (missing.value.status, missing.value.code) == (404, "model_not_found")
    assert "no-such-model" in missing.value.message
    with pytest.raises(ValidationError) as invalid:
        client.predict([1.0, 2.0], model="iris")
    assert (invalid.value.status, invalid.value.code) == (422, "validation_failed")
    assert "expects 4" in invalid.value.message and not invalid.value.retryable
    with pytest.raises(NotFound):
        client.get("req_00000000000000000000000000")
    with pytest.raises(NotFound):
        next(client.stream("req_00000000000000000000000000"))


def test_models_and_health(client: Client) -> None:
    assert {"iris", "iris-forest", "streamer"} <= {m.name for m in client.models()}
    iris = client.model("iris")
    assert (iris.version, iris.ready, iris.runtime) == ("1", True, "sklearn")
    assert iris.raw["outputs"]["labels"] == ["setosa", "versicolor", "virginica"]
    health = client.health()
    assert health.ready and health.models["streamer"] == health.models["iris"] == "ready"


# ---------------------------------------------------------------- long-running requests


def test_submit_then_follow_to_completion(client: Client) -> None:
    job = client.submit("streamer", "go", {"chunks": 4})
    assert job.status == "queued" and not job.replayed
    assert list(client.follow(job.id)) == ["go-0", "go-1", "go-2", "go-3"]
    record = client.get(job.id)
    assert record.status == "succeeded" and record.terminal
    assert record.chunks == ["go-0", "go-1", "go-2", "go-3"]
    assert record.result["text"] == "go-0go-1go-2go-3"
    # The stream, replayed from the store: every event once, numbered from 1, ending in done.
    events = list(client.stream(job.id))
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    assert isinstance(events[0], StatusEvent) and events[0].status == "queued"
    assert isinstance(events[-1], DoneEvent) and events[-1].result == record.result


def test_idempotency_keys(client: Client) -> None:
    first = client.submit("streamer", "once", {"chunks": 1}, idempotency_key="client-key-1")
    again = client.submit("streamer", "once", {"chunks": 1}, idempotency_key="client-key-1")
    assert again.id == first.id and again.replayed and not first.replayed
    with pytest.raises(Conflict) as conflict:
        client.submit("streamer", "other", {"chunks": 1}, idempotency_key="client-key-1")
    assert conflict.value.status == 409
    # Generated keys differ per call: two submits are two requests.
    assert (
        client.submit("streamer", "a", {"chunks": 1}).id
        != client.submit("streamer", "a", {"chunks": 1}).id
    )


def test_list_pages_through_the_cursor(client: Client) -> None:
    mine = [client.submit("streamer", f"page-{i}", {"chunks": 1}).id for i in range(5)]
    paged = [r.id for r in client.list(page_size=2)]
    whole = [r.id for r in client.list(page_size=100)]
    assert paged == whole and len(set(paged)) == len(paged) >= 5
    assert [i for i in paged if i in mine] == mine[::-1]  # newest first
    assert [r.id for r in client.list(3, page_size=2)] == paged[:3]


def test_cancel_a_running_request(client: Client) -> None:
    job = client.submit("streamer", "long", {"chunks": 100000})
    events = client.stream(job.id)
    first = next(e for e in events if isinstance(e, ResponseEvent))
    assert first.response == "long-0"
    assert client.cancel(job.id).cancel_requested
    rest = list(events)
    assert isinstance(rest[-1], ErrorEvent) and rest[-1].status == "cancelled"
    with pytest.raises(RequestFailed) as failed:
        list(client.follow(job.id))
    assert failed.value.request_status == "cancelled"
    assert client.get(job.id).status == "cancelled"


def test_resume_after_closing_a_stream(client: Client) -> None:
    job = client.submit("streamer", "resume", {"chunks": 6})
    seen: list[Event] = []
    for event in client.stream(job.id):
        seen.append(event)
        if len(seen) == 3:
            break  # the connection closes here
    assert seen[-1].id == 3
    rest = list(client.stream(job.id, last_event_id=3))
    ids = [e.id for e in seen + rest]
    assert ids == list(range(1, len(ids) + 1))
    chunks = [e.response for e in seen + rest if isinstance(e, ResponseEvent)]
    assert chunks == [f"resume-{i}" for i in range(6)]


class CuttingProxy:
    """A loopback TCP proxy to the server that cuts each of its first connections after a
    number of bytes of the answer, mid-frame; it records what each connection asked."""

    def __init__(self, port: int, cuts: list[int]) -> None:
        self.port = port
        self.cuts = list(cuts)
        self.asked: list[bytes] = []
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closed = True
        self._listener.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                downstream, _ = self._listener.accept()
            except OSError:
                return
            limit = self.cuts.pop(0) if self.cuts else None
            threading.Thread(target=self._pipe, args=(downstream, limit), daemon=True).start()

    def _pipe(self, downstream: socket.socket, limit: int | None) -> None:
        upstream = socket.create_connection(("127.0.0.1", self.port))
        asked = bytearray()
        self.asked.append(b"")
        index = len(self.asked) - 1

        def forward_request() -> None:
            try:
                while data := downstream.recv(65536):
                    asked.extend(data)
                    self.asked[index] = bytes(asked)
                    upstream.sendall(data)
            except OSError:
                pass

        threading.Thread(target=forward_request, daemon=True).start()
        sent = 0
        try:
            while data := upstream.recv(65536):
                if limit is not None and sent + len(data) >= limit:
                    downstream.sendall(data[: limit - sent])
                    break
                downstream.sendall(data)
                sent += len(data)
        except OSError:
            pass
        finally:
            for sock in (downstream, upstream):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()


def test_dropped_connections_resume_with_last_event_id(server: Server) -> None:
    proxy = CuttingProxy(server.port, cuts=[330, 300, 300])
    try:
        with Client(server.url) as direct, Client(proxy.url, max_reconnects=3) as cut:
            job = direct.submit("streamer", "drop", {"chunks": 8})
            events = list(cut.stream(job.id))
    finally:
        proxy.close()
    assert [e.id for e in events] == list(range(1, len(events) + 1))  # each once, in order
    chunks = [e.response for e in events if isinstance(e, ResponseEvent)]
    assert chunks == [f"drop-{i}" for i in range(8)]
    assert isinstance(events[-1], DoneEvent)
    assert len(proxy.asked) >= 4  # three cut connections, then one that ran to the end
    resumed = [_last_event_id(asked) for asked in proxy.asked]
    assert resumed[0] is None
    assert all(r is not None for r in resumed[1:])
    assert resumed[1:] == sorted(resumed[1:])  # type: ignore[type-var]


def _last_event_id(request: bytes) -> int | None:
    for line in request.decode("latin-1").split("\r\n"):
        name, _, value = line.partition(":")
        if name.strip().lower() == "last-event-id":
            return int(value.strip())
    return None


async def test_async_client(server: Server) -> None:
    async with AsyncClient(server.url) as client:
        answer = await client.predict(SETOSA, model="iris")
        assert answer.label == "setosa"
        job = await client.submit("streamer", "async", {"chunks": 3})
        assert [chunk async for chunk in client.follow(job.id)] == ["async-0", "async-1", "async-2"]
        listed = [r.id async for r in client.list(4, page_size=1)]
        assert len(listed) == 4 and listed[0] == job.id
        assert (await client.get(job.id)).status == "succeeded"
        with pytest.raises(NotFound):
            await client.model("no-such-model")


# ---------------------------------------------------------------- retries and auth


def test_retries_while_the_model_loads(tmp_path: Path) -> None:
    models = tmp_path / "models"
    write_scripted_model(models, "slow", load_delay_s=3.0)
    slow = Server(["--models-dir", str(models)], tmp_path)
    try:
        end = time.monotonic() + 30
        while True:  # listening, not ready yet
            try:
                if httpx.get(slow.url + "/health/live", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < end, slow.output()
            time.sleep(0.05)
        with Client(slow.url, retry=RetryPolicy(max_attempts=1)) as impatient:
            assert not impatient.health().ready
            with pytest.raises(ModelNotReady) as refused:
                impatient.predict([1.0, 0.0, 0.0, 0.0], model="slow")
        assert (refused.value.status, refused.value.retry_after) == (503, 1.0)
        with Client(slow.url, retry=RetryPolicy(max_attempts=20)) as patient:
            answer = patient.predict([1.0, 0.0, 0.0, 0.0], model="slow")
        assert answer.label == "one"
        statuses: list[int] = []
        end = time.monotonic() + 10
        while 200 not in statuses and time.monotonic() < end:  # the access log is buffered
            time.sleep(0.1)
            statuses = [
                line["status_code"]
                for line in map(json.loads, filter(None, slow.output().splitlines()))
                if line.get("event") == "request" and line.get("path") == "/v1/models/slow/predict"
            ]
        assert statuses.count(503) >= 2 and statuses[-1] == 200  # the patient client retried
    finally:
        slow.stop(signal.SIGKILL)


def test_usage_and_scopes_with_auth_on(tmp_path: Path, models_dir: Path) -> None:
    database_url = f"sqlite+aiosqlite:///{tmp_path / 'inferd.db'}"
    config = _config(
        tmp_path / "inferd.toml",
        models_dir=str(models_dir),
        database_url=database_url,
        auth="required",
        key_cache_seconds=0,
    )
    key = asyncio.run(_create_key(database_url, "ursula", ["predict"], daily_tokens=50))
    slow_key = asyncio.run(_create_key(database_url, "sam", ["predict"], rate="1/s"))
    secured = Server(["--config", str(config)], tmp_path)
    try:
        secured.wait_ready()
        with Client(secured.url, api_key=key) as client:
            client.predict_batch([SETOSA, VIRGINICA], model="iris")
            usage = client.usage()
            assert (usage.user, usage.scopes, usage.daily_tokens) == ("ursula", ["predict"], 50)
            assert (usage.tokens_used_today, usage.tokens_left_today) == (2, 48)
            with pytest.raises(Forbidden) as forbidden:
                client.submit("iris", {"features": SETOSA})  # the key lacks "requests"
            assert forbidden.value.status == 403
        with Client(secured.url) as anonymous, pytest.raises(Unauthorized):
            anonymous.predict(SETOSA)
        # One request a second: the second at once is refused with Retry-After...
        with Client(secured.url, slow_key, retry=RetryPolicy(max_attempts=1)) as impatient:
            impatient.predict(SETOSA)
            with pytest.raises(RateLimited) as limited:
                impatient.predict(SETOSA)
        assert limited.value.status == 429 and limited.value.retry_after is not None
        # ...and a client that may retry waits for it and gets its answer.
        with Client(secured.url, slow_key) as patient:
            assert patient.predict(SETOSA).prediction == 0
        # The command line reads the key from INFERD_API_KEY.
        listed = _cli(
            "predict", *map(str, SETOSA), extra={"INFERD_URL": secured.url, "INFERD_API_KEY": key}
        )
        assert listed.returncode == 0, listed.stderr
        assert json.loads(listed.stdout)["prediction"] == 0
    finally:
        secured.stop(signal.SIGKILL)


async def _create_key(
    database_url: str,
    user: str,
    scopes: list[str],
    daily_tokens: int | None = None,
    rate: str | None = None,
) -> str:
    from inferd.db.migrate import migrate
    from inferd.jobs.sql import SqlStore
    from inferd.tenancy.keys import KeyStore

    await migrate(database_url)
    store = SqlStore(database_url)
    try:
        key, _ = await KeyStore(store.engine).create(user, scopes, rate, daily_tokens)
    finally:
        await store.close()
    return key


# ---------------------------------------------------------------- the command line


def _cli(*args: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [INFERD, *args], env={**env(), **(extra or {})}, capture_output=True, text=True, timeout=60
    )


def _cli_all(*commands: tuple[str, ...], url: str) -> list[subprocess.CompletedProcess[str]]:
    """Run independent commands at once (each is a process start-up of its own)."""
    procs = [
        subprocess.Popen(
            [INFERD, *args],
            env={**env(), "INFERD_URL": url},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for args in commands
    ]
    done = []
    for args, proc in zip(commands, procs, strict=True):
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            out, err = proc.communicate()
            raise AssertionError(
                f"inferd {' '.join(args)} hung; it printed:\n{out}\n{err}"
            ) from None
        done.append(subprocess.CompletedProcess(list(args), proc.returncode, out, err))
    return done


def test_cli_predict(server: Server) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    ok, batch, wrong, unknown, down = _cli_all(
        ("predict", *map(str, SETOSA)),
        ("predict", "--model", "iris", "--json", json.dumps({"instances": [SETOSA, VIRGINICA]})),
        ("predict", "--model", "iris", "1", "2"),
        ("predict", "--model", "nope", "1", "2", "3", "x"),
        ("predict", "--url", closed, *map(str, SETOSA)),
        url=server.url,
    )
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["prediction"] == 0
    assert batch.returncode == 0, batch.stderr
    assert [row["label"] for row in json.loads(batch.stdout)] == ["setosa", "virginica"]
    assert wrong.returncode == 2
    assert wrong.stderr.startswith("error: features has 2 values")
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == "error: feature 'x' is not a number"
    assert down.returncode == 1
    assert down.stderr.startswith(f"error: could not reach {closed}")


def test_cli_requests(server: Server) -> None:
    # The streaming model runs one request at a time: the short one goes first.
    (followed,) = _cli_all(
        ("requests", "submit", "-m", "streamer", "-i", "cli", "-p", '{"chunks": 3}', "--follow"),
        url=server.url,
    )
    assert followed.returncode == 0, followed.stderr
    assert followed.stdout == "cli-0cli-1cli-2\n"
    assert followed.stderr.startswith("submitted req_")
    done_id = followed.stderr.split()[1]
    submitted, record = _cli_all(
        ("requests", "submit", "-m", "streamer", "-i", '"long"', "-p", '{"chunks": 100000}'),
        ("requests", "get", done_id),
        url=server.url,
    )
    assert submitted.returncode == 0, submitted.stderr
    long_id = submitted.stdout.strip()
    assert record.returncode == 0, record.stderr
    assert json.loads(record.stdout)["status"] == "succeeded"
    follow, cancelled, listed, missing = _cli_all(
        ("requests", "follow", long_id, "--json"),
        ("requests", "cancel", long_id),
        ("requests", "list", "--limit", "2"),
        ("requests", "get", "req_00000000000000000000000000"),
        url=server.url,
    )
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.startswith(long_id)
    assert follow.returncode == 1
    assert follow.stderr.startswith(f"error: request {long_id} cancelled")
    events = [json.loads(line) for line in follow.stdout.splitlines()]
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    assert events[-1]["event"] == "error" and events[-1]["data"]["status"] == "cancelled"
    assert listed.returncode == 0, listed.stderr
    assert long_id in listed.stdout and done_id in listed.stdout
    assert missing.returncode == 2
    assert missing.stderr.startswith("error: request 'req_00000000000000000000000000'")


def test_cli_dead_letters_and_requeue(server: Server, client: Client) -> None:
    job = client.submit("streamer", "boom")  # fails on every attempt: dead after 3
    ok = client.submit("streamer", "fine", {"chunks": 1})
    deadline = time.monotonic() + 30
    while client.get(job.id).status != "dead" or client.get(ok.id).status != "succeeded":
        assert time.monotonic() < deadline, client.get(job.id)
        time.sleep(0.1)
    # The listing first: a requeue running beside it could take the request off the list.
    (listed,) = _cli_all(("requests", "dead", "--model", "streamer", "--json"), url=server.url)
    requeued, refused = _cli_all(
        ("requests", "requeue", job.id, "--attempts", "1"),
        ("requests", "requeue", ok.id),
        url=server.url,
    )
    assert listed.returncode == 0, listed.stderr
    assert job.id in [r["id"] for r in json.loads(listed.stdout)]
    assert requeued.returncode == 0, requeued.stderr
    assert requeued.stdout == f"{job.id} queued\n"
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"error: request {ok.id!r} is succeeded")
    while (record := client.get(job.id)).status != "dead":
        assert time.monotonic() < deadline + 30, record
        time.sleep(0.1)
    assert (record.attempts, record.max_attempts) == (4, 4)  # one more attempt, and it ran


# ---------------------------------------------------------------- routes added beside this client


@pytest.mark.skipif(
    not _route_module("v2.py"), reason="this server has no Open Inference Protocol routes"
)
def test_infer_with_v2_tensors(client: Client) -> None:
    rows = np.array([SETOSA, VIRGINICA], dtype=np.float32)
    by_name = client.infer("iris", {"input": rows}, request_id="v2-1")
    assert (by_name.model_name, by_name.model_version, by_name.id) == ("iris", "1", "v2-1")
    assert by_name["label"].tolist() == ["setosa", "virginica"]
    probabilities = by_name["probabilities"]
    assert probabilities.dtype == np.float64 and probabilities.shape == (2, 3)
    assert probabilities.argmax(axis=1).tolist() == [0, 2]
    # A bare array is named after the model's declared input; a version may be asked for.
    by_position = client.infer("iris", [rows[:1]], version="1", outputs=["label"])
    assert list(by_position.outputs) == ["label"] and by_position["label"].tolist() == ["setosa"]
    with pytest.raises(NotFound):
        client.infer("no-such-model", {"input": rows})
    with pytest.raises(BadRequest):
        client.infer("iris", {"input": np.zeros((1, 2))})


@pytest.mark.skipif(
    not _route_module("vision_api.py"), reason="this server has no image classification route"
)
def test_classify_an_image(client: Client, tmp_path: Path) -> None:
    from PIL import Image

    def png(shade: int) -> bytes:
        out = io.BytesIO()
        Image.new("L", (20, 12), shade).save(out, format="PNG")
        return out.getvalue()

    dark = client.classify(png(0), "brightness")
    assert (dark.model, dark.version) == ("brightness", "1")
    assert [p.label for p in dark.predictions] == ["dark", "light"]
    assert dark.predictions[0].class_id == 0 and dark.predictions[0].probability > 0.9
    assert dark.inference_time_ms is not None and dark.inference_time_ms >= 0
    path = tmp_path / "white.png"
    path.write_bytes(png(255))
    (light,) = client.classify(path, "brightness", top_k=1).predictions
    assert (light.label, light.class_id) == ("light", 1)
    (by_name,) = client.classify(str(path), "brightness", top_k=1).predictions
    assert by_name == light
    with pytest.raises(BadRequest) as bad:
        client.classify(b"not a picture", "brightness")
    assert bad.value.status is not None and 400 <= bad.value.status < 500
    with pytest.raises(NotFound):
        client.classify(png(0), "no-such-model")
    with pytest.raises(ValueError, match="cannot read image"):
        client.classify(tmp_path / "missing.png", "brightness")
