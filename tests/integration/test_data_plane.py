"""Every route runs the one prediction procedure (inferd.serving): what used to differ between
the copies of it, checked on each route through the app in-process."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.support.models import write_scripted_model
from tests.support.vision import encode, picture, write_image_model


class Connection:
    """An ASGI ``receive`` that sends ``body`` once ``release`` is set, on an object with
    uvicorn's ``disconnected`` flag (what :func:`inferd.http.context.disconnect_probe` reads)."""

    def __init__(self, body: bytes, leave_after_body: bool = False) -> None:
        self.body = body
        self.release = asyncio.Event()
        self.disconnected = False
        self.leave_after_body = leave_after_body
        self.sent: list[dict[str, Any]] = []
        self._delivered = False

    async def receive(self) -> dict[str, Any]:
        if not self._delivered:
            await self.release.wait()
            self._delivered = True
            if self.leave_after_body:
                self.disconnected = True
            return {"type": "http.request", "body": self.body, "more_body": False}
        await asyncio.Event().wait()  # nothing more until the test ends
        raise AssertionError("unreachable")

    async def send(self, message: dict[str, Any]) -> None:
        self.sent.append(message)

    def answer(self) -> tuple[int, Any]:
        status = self.sent[0]["status"]
        return status, json.loads(self.sent[1]["body"])


async def until(condition: Callable[[], bool], within: float = 5.0) -> None:
    for _ in range(int(within / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("the condition did not come true in time")


def scope(path: str, content_type: bytes = b"application/json") -> dict[str, Any]:
    return {
        "type": "http",
        "method": "POST",
        "path": path,
        "raw_path": path.encode(),
        "headers": [(b"content-type", content_type)],
        "query_string": b"",
    }


def rewrite_with_three_features(models_dir: Path, name: str) -> None:
    """Version 2 of a scripted model whose model.toml now takes three features."""
    write_scripted_model(models_dir, name, 2)
    toml = models_dir / name / "model.toml"
    text = toml.read_text()
    text = text.replace('features = ["a", "b", "c", "d"]', 'features = ["a", "b", "c"]')
    text = text.replace("example = [0.0, 0.0, 0.0, 0.0]", "example = [0.0, 0.0, 0.0]")
    text = text.replace('labels = ["zero", "one", "two"]', 'labels = ["x", "y", "z"]')
    toml.write_text(text)


async def test_the_hot_path_validates_against_the_version_it_swapped_to(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    """A request looked its model up, then the model changed (three features, new labels)
    while its body was read: the body is validated and answered as the new version says."""
    write_scripted_model(models_dir, "shape")
    async with serve(request_timeout_ms=10_000) as s:
        fits_new = Connection(orjson.dumps({"features": [1, 0, 0]}))
        fits_old = Connection(orjson.dumps({"features": [1, 0, 0, 0]}))
        requests = [
            asyncio.ensure_future(s.app(scope("/v1/models/shape/predict"), c.receive, c.send))
            for c in (fits_new, fits_old)
        ]
        await asyncio.sleep(0.05)  # both looked up version 1 and wait for their bodies
        rewrite_with_three_features(models_dir, "shape")
        swapped = await s.client.post("/v1/admin/models/shape/load")
        fits_new.release.set()
        fits_old.release.set()
        await asyncio.gather(*requests)
    assert swapped.status_code == 200, swapped.text
    status, body = fits_new.answer()
    assert status == 200, body
    assert (body["model_version"], body["label"]) == ("2", "y")
    status, body = fits_old.answer()
    assert status == 422
    assert "expects 3" in body["error"]["message"]


async def test_v2_infer_cancelled_by_the_server_is_not_a_client_disconnect(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    """A handler cancelled while it waits for its batch (a shutdown, a timeout of the server's
    own) stays cancelled: it is not answered as a gone client nor counted as one."""
    write_scripted_model(models_dir, "slow", delay_s=0.5)
    body = orjson.dumps(
        {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64", "data": [1, 0, 0, 0]}]}
    )
    async with serve(request_timeout_ms=10_000) as s:
        batcher = s.app.registry.get("slow").batcher
        first = asyncio.ensure_future(
            s.client.post("/v1/models/slow/predict", json={"features": [0, 0, 0, 0]})
        )
        await until(lambda: batcher.running > 0)
        conn = Connection(body)
        conn.release.set()
        handler = asyncio.ensure_future(
            s.app(scope("/v2/models/slow/infer"), conn.receive, conn.send)
        )
        await until(lambda: batcher.depth > 0)
        handler.cancel()
        await asyncio.gather(handler, return_exceptions=True)
        await first
        metrics = (await s.client.get("/metrics")).text
    assert handler.cancelled()
    assert 'inference_client_disconnects_total{model="slow",version="1"} 1.0' not in metrics


async def test_classify_drops_an_image_whose_client_left(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    """The client sent its image and left before it was queued: the image is dropped unrun,
    counted as a disconnect, and nothing is answered."""
    write_image_model(models_dir, "tiny-vision")
    async with serve() as s:
        loaded = s.app.registry.get("tiny-vision")
        before = loaded.batcher.stats.batches
        conn = Connection(encode(picture(40, 30), "PNG"), leave_after_body=True)
        conn.release.set()
        await s.app(scope("/v1/models/tiny-vision/classify", b"image/png"), conn.receive, conn.send)
        metrics = (await s.client.get("/metrics")).text
    assert conn.sent == []
    assert loaded.batcher.stats.dropped_cancelled == 1
    assert loaded.batcher.stats.batches == before
    assert 'inference_client_disconnects_total{model="tiny-vision",version="1"} 1.0' in metrics


@pytest.mark.parametrize("instances", [1, 3])
async def test_a_tabular_long_running_request_runs_in_the_models_batcher(
    serve: Callable[..., Any], instances: int
) -> None:
    async with serve(workers=0) as s:
        batcher = s.app.registry.get("iris").batcher
        rows_before = batcher.stats.rows
        submitted = await s.client.post(
            "/v1/requests",
            json={"model": "iris", "input": {"instances": [[5.1, 3.5, 1.4, 0.2]] * instances}},
        )
        worker = s.app.backends.worker(s.app.settings, s.app.executor, 1)
        assert await worker.run_burst() == 1
        record = (await s.client.get(f"/v1/requests/{submitted.json()['id']}")).json()
    assert record["status"] == "succeeded", record
    assert [p["label"] for p in record["result"]["predictions"]] == ["setosa"] * instances
    assert batcher.stats.rows == rows_before + instances


async def test_a_tabular_job_never_runs_on_a_version_being_unloaded(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    """The job's model is swapped for version 2 before the job runs: version 2 answers."""
    write_scripted_model(models_dir, "scripted")
    async with serve(workers=0) as s:
        submitted = await s.client.post(
            "/v1/requests", json={"model": "scripted", "input": {"features": [2, 0, 0, 0]}}
        )
        old = s.app.registry.get("scripted")
        write_scripted_model(models_dir, "scripted", 2)
        assert (await s.client.post("/v1/admin/models/scripted/load")).status_code == 200
        worker = s.app.backends.worker(s.app.settings, s.app.executor, 1)
        await worker.run_burst()
        record = (await s.client.get(f"/v1/requests/{submitted.json()['id']}")).json()
    assert record["status"] == "succeeded", record
    assert record["result"]["model_version"] == "2"
    assert old.batcher.stats.rows == 0
