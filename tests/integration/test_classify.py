"""Image classification through the app in-process: uploads, limits, errors, URLs, metrics."""

from __future__ import annotations

import http.server
import os
import re
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from inferd.models.images import Preprocessor
from inferd.models.runtimes import RuntimeOptions, create_model
from inferd.models.spec import load_spec
from inferd.tenancy.auth import required_scope
from tests.support.vision import encode, picture, write_image_model

LABELS = ["cat", "dog", "bird"]


@pytest.fixture
def vision_models(models_dir: Path) -> Path:
    write_image_model(models_dir, "tiny-vision", image="max_bytes = 20000\nmax_pixels = 250000")
    return models_dir


def _expected(models_dir: Path, data: bytes) -> np.ndarray:
    """What the model itself answers for ``data``, outside the server."""
    spec = load_spec(models_dir / "tiny-vision" / "model.toml", "tiny-vision")
    model = create_model(spec, 1, models_dir / "tiny-vision" / "1", RuntimeOptions(device="cpu"))
    model.load()
    return model.predict(Preprocessor(spec.image).prepare(data).array)[0]  # type: ignore[arg-type]


async def test_a_raw_upload_gets_the_models_top_classes(
    serve: Callable[..., Any], vision_models: Path
) -> None:
    data = encode(picture(40, 30, seed=3), "PNG")
    async with serve() as served:
        # The client's Content-Type is not trusted: the bytes say PNG.
        r = await served.client.post(
            "/v1/models/tiny-vision/classify",
            content=data,
            headers={"Content-Type": "image/jpeg", "X-Request-ID": "img-1"},
        )
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["model"], body["version"], body["request_id"]) == ("tiny-vision", "1", "img-1")
    assert body["inference_time_ms"] >= 0
    expected = _expected(vision_models, data)
    order = np.argsort(-expected, kind="stable")
    assert [p["class_id"] for p in body["predictions"]] == order.tolist()  # 3 < top_k 5
    assert [p["label"] for p in body["predictions"]] == [LABELS[i] for i in order]
    np.testing.assert_allclose(
        [p["probability"] for p in body["predictions"]], expected[order], rtol=1e-6
    )


@pytest.mark.parametrize("field", ["file", "image"])
async def test_a_multipart_upload_with_top_k(
    serve: Callable[..., Any], vision_models: Path, field: str
) -> None:
    data = encode(picture(24, 24, seed=5), "JPEG", quality=90)
    async with serve() as served:
        r = await served.client.post(
            "/v1/models/tiny-vision/classify",
            params={"top_k": 1},
            data={"note": "hello"},
            files={field: ("digit.jpg", data, "image/jpeg")},
        )
    assert r.status_code == 200, r.text
    (only,) = r.json()["predictions"]
    assert only["class_id"] == int(np.argmax(_expected(vision_models, data)))


async def test_v1_predict_serves_the_first_image_model(
    serve: Callable[..., Any], vision_models: Path
) -> None:
    async with serve() as served:
        r = await served.client.post("/v1/predict", content=encode(picture(), "WEBP"))
        assert r.status_code == 200, r.text
        assert r.json()["model"] == "tiny-vision"
        metrics = (await served.client.get("/metrics")).text
    assert 'predictions_total{model="tiny-vision",status="success",version="1"} 1.0' in metrics
    assert 'prediction_duration_seconds_count{model="tiny-vision",version="1"} 1.0' in metrics


@pytest.mark.parametrize(
    ("kwargs", "status", "code", "message"),
    [
        ({"content": b"x" * 20_001}, 413, "payload_too_large", "over the limit of 20000 bytes"),
        (
            {"content": encode(Image.new("RGB", (600, 500)), "JPEG")},
            413,
            "payload_too_large",
            "600x500 pixels is over this model's limit of 250000",
        ),
        ({"content": encode(picture(), "GIF")}, 415, "unsupported_media_type", "GIF images"),
        ({"content": b"just some text"}, 415, "unsupported_media_type", "not a recognizable"),
        ({"content": b""}, 400, "bad_request", "no image in the request"),
        (
            {"files": {"upload": ("a.png", b"x", "image/png")}},
            400,
            "bad_request",
            "no field named file or image \\(fields: upload\\)",
        ),
        (
            {"json": {"url": "http://example.com/cat.png"}},
            400,
            "bad_request",
            "by URL are turned off",
        ),
        ({"content": b"x", "params": {"top_k": 4}}, 422, "validation_failed", "between 1 and 3"),
        ({"content": b"x", "params": {"top_k": 0}}, 422, "validation_failed", "top_k"),
    ],
)
async def test_bad_uploads_get_a_clear_4xx(
    serve: Callable[..., Any],
    vision_models: Path,
    kwargs: dict[str, Any],
    status: int,
    code: str,
    message: str,
) -> None:
    async with serve() as served:
        r = await served.client.post("/v1/models/tiny-vision/classify", **kwargs)
        metrics = (await served.client.get("/metrics")).text
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code
    assert re.search(message, error["message"]), error["message"]
    if status != 422 or "between" in message:
        assert (
            f'predictions_total{{model="tiny-vision",status="{code}",version="1"}} 1.0' in metrics
        )


async def test_unknown_and_non_image_models(serve: Callable[..., Any], vision_models: Path) -> None:
    png = encode(picture(), "PNG")
    async with serve() as served:
        missing = await served.client.post("/v1/models/nope/classify", content=png)
        tabular = await served.client.post("/v1/models/iris/classify", content=png)
        as_rows = await served.client.post(
            "/v1/models/tiny-vision/predict", json={"features": [1.0]}
        )
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"
    assert tabular.status_code == 400
    assert (
        "takes tabular input, not images; use POST /v1/models/iris/predict"
        in (tabular.json()["error"]["message"])
    )
    assert as_rows.status_code == 422
    message = as_rows.json()["error"]["message"]
    assert "takes images; POST one to /v1/models/tiny-vision/classify" in message


async def test_a_deadline_that_passes_is_504(
    serve: Callable[..., Any], vision_models: Path
) -> None:
    async with serve() as served:
        r = await served.client.post(
            "/v1/models/tiny-vision/classify",
            content=encode(picture(), "PNG"),
            headers={"X-Request-Timeout-Ms": "0.001"},
        )
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "deadline_exceeded"


@pytest.fixture
def image_host() -> Iterator[str]:
    """A real HTTP server on loopback that serves /cat.png."""
    data = encode(picture(32, 32, seed=9), "PNG")

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path != "/cat.png":
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_images_by_url_only_from_allowed_hosts(
    serve: Callable[..., Any], vision_models: Path, image_host: str
) -> None:
    async with serve(image_url_allowed_hosts=["127.0.0.1"]) as served:
        ok = await served.client.post(
            "/v1/models/tiny-vision/classify", json={"url": f"{image_host}/cat.png"}
        )
        missing = await served.client.post(
            "/v1/models/tiny-vision/classify", json={"url": f"{image_host}/dog.png"}
        )
        other = await served.client.post(
            "/v1/models/tiny-vision/classify", json={"url": "http://localhost:1/cat.png"}
        )
    assert ok.status_code == 200, ok.text
    assert len(ok.json()["predictions"]) == 3
    assert missing.status_code == 400
    assert "gave HTTP 404" in missing.json()["error"]["message"]
    assert other.status_code == 403
    assert other.json()["error"] == {
        "code": "url_not_allowed",
        "message": "images by URL are allowed from 127.0.0.1 only, not from 'localhost'",
        "retryable": False,
    }


def test_classify_routes_need_the_predict_scope() -> None:
    assert required_scope("POST", "/v1/predict") == "predict"
    assert required_scope("POST", "/v1/models/digits/classify") == "predict"


async def test_each_image_costs_one_token_of_the_daily_budget(
    serve: Callable[..., Any], vision_models: Path
) -> None:
    png = encode(picture(), "PNG")
    url = "/v1/models/tiny-vision/classify"
    async with serve(auth="required") as s:
        key, _ = await s.app.keys.create("carol", ["predict"], daily_tokens=2)
        other, _ = await s.app.keys.create("dave", ["requests"])
        auth = {"Authorization": f"Bearer {key}"}
        first = await s.client.post(url, content=png, headers=auth)
        refused_gif = await s.client.post(url, content=encode(picture(), "GIF"), headers=auth)
        second = await s.client.post(url, content=png, headers=auth)
        third = await s.client.post("/v1/predict", content=png, headers=auth)
        no_scope = await s.client.post(url, content=png, headers={"X-API-Key": other})
        usage = (await s.client.get("/v1/usage", headers=auth)).json()
    assert [first.status_code, refused_gif.status_code, second.status_code] == [200, 415, 200]
    assert '"daily";r=1;' in first.headers["ratelimit"]
    assert third.status_code == 429
    assert third.json()["error"]["code"] == "quota_exceeded"
    assert no_scope.status_code == 403
    assert usage["tokens_used_today"] == 2


async def test_model_metadata_describes_image_input_and_device(
    serve: Callable[..., Any], vision_models: Path
) -> None:
    async with serve() as served:
        image = (await served.client.get("/v1/models/tiny-vision")).json()
        iris = (await served.client.get("/v1/models/iris")).json()
    assert image["inputs"]["type"] == "image"
    assert image["inputs"]["endpoint"] == "/v1/models/tiny-vision/classify"
    assert image["inputs"]["max_bytes"] == 20000
    assert image["device"] == "cpu"  # no GPU in the test environment
    assert iris["inputs"]["type"] == "tabular"
    assert iris["inputs"]["features"][0] == "sepal_length_cm"
    assert iris["device"] == "cpu"


async def test_a_torch_model_on_the_cpu_shares_the_cores_among_its_batches(
    serve: Callable[..., Any], vision_models: Path
) -> None:
    cores = os.cpu_count() or 1
    async with serve() as served:
        auto = served.app.registry.get("tiny-vision")
        iris = served.app.registry.get("iris")
        assert auto.batcher is not None and iris.batcher is not None
        batches, threads = auto.batcher.concurrency, auto.model.threads  # type: ignore[attr-defined]
        assert iris.batcher.concurrency == 1  # tabular models keep the settings' default
    assert batches == max(1, min(4, cores))
    assert threads == max(1, cores // batches)
    async with serve(batch_concurrency=1) as served:  # said explicitly: kept
        said = served.app.registry.get("tiny-vision")
        assert said.batcher is not None and said.batcher.concurrency == 1
        assert said.model.threads == cores  # type: ignore[attr-defined]


async def test_an_upload_read_during_a_swap_is_served_by_the_new_version(
    serve: Callable[..., Any], vision_models: Path
) -> None:
    """The model is looked up before the upload arrives; version 2 replaces version 1 (which
    drains and unloads) while the upload is read; the image must still be classified."""
    import asyncio
    import json
    import shutil

    data = encode(picture(24, 24, seed=9), "PNG")
    async with serve(image_request_timeout_ms=10_000) as served:
        shutil.copytree(vision_models / "tiny-vision" / "1", vision_models / "tiny-vision" / "2")
        body_sent = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await body_sent.wait()
            return {"type": "http.request", "body": data, "more_body": False}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "http_version": "1.1",
            "method": "POST",
            "scheme": "http",
            "server": ("inferd", 80),
            "path": "/v1/models/tiny-vision/classify",
            "raw_path": b"/v1/models/tiny-vision/classify",
            "root_path": "",
            "headers": [(b"content-type", b"image/png"), (b"host", b"inferd")],
            "query_string": b"",
        }
        request = asyncio.ensure_future(served.app(scope, receive, send))
        await asyncio.sleep(0.05)  # looked up version 1, now waiting for the upload
        swapped = await served.client.post("/v1/admin/models/tiny-vision/load")
        body_sent.set()
        await request
    assert swapped.status_code == 200, swapped.text
    assert sent[0]["status"] == 200, sent
    answer = json.loads(sent[1]["body"])
    assert answer["version"] == "2"
    assert answer["predictions"][0]["class_id"] == int(np.argmax(_expected(vision_models, data)))
