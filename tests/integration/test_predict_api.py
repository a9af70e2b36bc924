"""The prediction routes through the whole app, in-process."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from inferd.http.routes import LEAN_ROUTES, match_lean
from tests.support.models import BATCHES, write_scripted_model

IRIS_SETOSA = [5.1, 3.5, 1.4, 0.2]
IRIS_VIRGINICA = [6.7, 3.0, 5.2, 2.3]


async def test_predict_answer_shape(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        r = await s.client.post(
            "/predict", json={"features": IRIS_SETOSA, "request_id": "test-001"}
        )
    assert r.status_code == 200
    body = r.json()
    assert set(body) == {"prediction", "confidence", "model_version", "request_id"}
    assert body["prediction"] == 0
    assert 0.9 < body["confidence"] <= 1.0
    assert body["model_version"] == "1"
    assert body["request_id"] == "test-001"
    assert r.headers["x-request-id"] == "test-001"
    assert r.headers["content-type"] == "application/json"


async def test_request_id_from_header_or_generated(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        given = await s.client.post(
            "/predict", json={"features": IRIS_SETOSA}, headers={"X-Request-ID": "abc-123"}
        )
        generated = await s.client.post("/predict", json={"features": IRIS_SETOSA})
        other = await s.client.get("/health", headers={"X-Request-ID": "probe-7"})
    assert given.json()["request_id"] == "abc-123"
    assert given.headers["x-request-id"] == "abc-123"
    assert generated.json()["request_id"] == generated.headers["x-request-id"]
    assert len(generated.json()["request_id"]) > 8
    assert other.headers["x-request-id"] == "probe-7"


async def test_named_model_single_and_batch(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        one = await s.client.post(
            "/v1/models/iris-forest/predict", json={"features": IRIS_VIRGINICA}
        )
        many = await s.client.post(
            "/v1/models/iris/predict", json={"instances": [IRIS_SETOSA, IRIS_VIRGINICA]}
        )
    assert one.status_code == 200
    single = one.json()
    assert single["model"] == "iris-forest"
    assert single["label"] == "virginica"
    assert single["prediction"] == 2
    assert len(single["probabilities"]) == 3
    assert many.status_code == 200
    rows = many.json()["predictions"]
    assert [r["label"] for r in rows] == ["setosa", "virginica"]
    assert all(abs(sum(r["probabilities"]) - 1) < 1e-9 for r in rows)


async def test_predictions_match_the_model_offline(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    import joblib
    import numpy as np

    estimator = joblib.load(models_dir / "iris" / "1" / "model.joblib")
    rows = np.random.default_rng(1).uniform(0, 8, size=(20, 4)).round(2).tolist()
    async with serve() as s:
        r = await s.client.post("/v1/models/iris/predict", json={"instances": rows})
    expected = estimator.predict_proba(np.array(rows))
    got = np.array([p["probabilities"] for p in r.json()["predictions"]])
    assert np.allclose(got, expected, atol=1e-12)


@pytest.mark.parametrize(
    ("content", "headers", "status", "code", "fragment"),
    [
        (b'{"features": [1, 2', {}, 400, "bad_request", "not valid JSON"),
        (b"[1, 2, 3, 4]", {}, 400, "bad_request", "JSON object"),
        (b'{"features": [1, 2, 3]}', {}, 422, "validation_failed", "expects 4"),
        (b'{"features": [1, 2, "x", 4]}', {}, 422, "validation_failed", "must be a number"),
        (b'{"features": [1, 2, true, 4]}', {}, 422, "validation_failed", "a boolean"),
        (b'{"features": [1, 2, NaN, 4]}', {}, 422, "validation_failed", "finite"),
        (b'{"features": [1, 2, Infinity, 4]}', {}, 422, "validation_failed", "finite"),
        (b'{"features": [1, 2, 1e999, 4]}', {}, 422, "validation_failed", "finite"),
        (b'{"feature": [1, 2, 3, 4]}', {}, 422, "validation_failed", "unknown field"),
        (b"{}", {}, 422, "validation_failed", "missing field"),
        (b'{"features": [1, 2, 3, 4]}', {"content-type": "text/plain"}, 415,
         "unsupported_media_type", "application/json"),
        (b'{"features": [1, 2, 3, 4]}', {"x-request-timeout-ms": "soon"}, 400, "bad_request",
         "X-Request-Timeout-Ms"),
    ],
)  # fmt: skip
async def test_bad_input_gets_a_clear_4xx(
    serve: Callable[..., Any],
    content: bytes,
    headers: dict[str, str],
    status: int,
    code: str,
    fragment: str,
) -> None:
    async with serve() as s:
        r = await s.client.post(
            "/predict", content=content, headers={"content-type": "application/json", **headers}
        )
        after = await s.client.post("/predict", json={"features": IRIS_SETOSA})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert error["code"] == code
    assert fragment in error["message"]
    assert error["retryable"] is False
    assert after.status_code == 200  # nothing broke


async def test_oversize_bodies_are_refused(serve: Callable[..., Any]) -> None:
    async with serve(max_body_bytes=1024, max_instances=10) as s:
        big = await s.client.post(
            "/v1/models/iris/predict", json={"instances": [IRIS_SETOSA] * 200}
        )
        many = await s.client.post(
            "/v1/models/iris/predict", json={"instances": [IRIS_SETOSA] * 11}
        )

        async def chunks() -> Any:
            for _ in range(40):
                yield b" " * 100  # no Content-Length: counted while read

        streamed = await s.client.post(
            "/predict", content=chunks(), headers={"content-type": "application/json"}
        )
    assert big.status_code == 413
    assert "1024" in big.json()["error"]["message"]
    assert many.status_code == 413
    assert "11 instances" in many.json()["error"]["message"]
    assert streamed.status_code == 413


async def test_unknown_model_and_wrong_method(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        missing = await s.client.post("/v1/models/nope/predict", json={"features": IRIS_SETOSA})
        meta = await s.client.get("/v1/models/nope")
        wrong = await s.client.get("/predict")
        batch_on_default = await s.client.post("/predict", json={"instances": [IRIS_SETOSA]})
    assert missing.status_code == 404
    assert "iris, iris-forest" in missing.json()["error"]["message"]
    assert meta.status_code == 404
    assert wrong.status_code == 405
    assert wrong.json()["error"]["code"] == "method_not_allowed"
    assert batch_on_default.status_code == 422


async def test_model_listing_and_metadata(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        listing = (await s.client.get("/v1/models")).json()
        meta = (await s.client.get("/v1/models/iris")).json()
    assert listing["default"] == "iris"
    assert [m["name"] for m in listing["models"]] == ["iris", "iris-forest"]
    assert meta["ready"] is True
    assert meta["version"] == "1"
    assert meta["inputs"]["features"][0] == "sepal_length_cm"
    assert meta["outputs"]["labels"] == ["setosa", "versicolor", "virginica"]
    assert meta["batching"]["max_batch_size"] == 32
    assert meta["batching"]["max_queue_size"] == 2000
    assert meta["batching"]["shed_at"] == 1600


async def test_default_model_setting(serve: Callable[..., Any]) -> None:
    async with serve(default_model="iris-forest") as s:
        r = await s.client.post("/predict", json={"features": IRIS_VIRGINICA})
        listing = (await s.client.get("/v1/models")).json()
    assert r.json()["prediction"] == 2
    assert listing["default"] == "iris-forest"


async def test_the_lean_routes_and_their_documentation_are_one_table(
    serve: Callable[..., Any],
) -> None:
    """Every route the lean path answers is documented, with its path parameters, and every
    documented prediction (or V2 infer) route is one the lean path answers."""
    async with serve() as s:
        schema = (await s.client.get("/openapi.json")).json()
    documented = {
        (method.upper(), path): operation
        for path, item in schema["paths"].items()
        for method, operation in item.items()
        if "predict" in operation.get("tags", []) or path.endswith("/infer")
    }
    assert {(r.method, r.path) for r in LEAN_ROUTES} == set(documented)
    for route in LEAN_ROUTES:
        params = {p["name"] for p in documented[(route.method, route.path)].get("parameters", [])}
        assert params == set(route.params), route.path
        example = route.path.replace("{name}", "iris").replace("{version}", "1")
        assert match_lean(route.method, example) is not None, example


async def test_openapi_documents_the_hot_routes(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        schema = (await s.client.get("/openapi.json")).json()
        docs = await s.client.get("/docs")
        redoc = await s.client.get("/redoc")
    assert "/predict" in schema["paths"]
    assert "/v1/models/{name}/predict" in schema["paths"]
    body = schema["paths"]["/predict"]["post"]["requestBody"]["content"]["application/json"]
    assert "features" in body["schema"]["properties"]
    assert docs.status_code == 200 and "swagger" in docs.text.lower()
    assert redoc.status_code == 200 and "redoc" in redoc.text.lower()


# ---------------------------------------------------------------- admission and failure


async def test_deadline_gives_504_and_counts_a_timeout(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    write_scripted_model(models_dir, "slow", delay_s=0.3)
    async with serve() as s:
        r = await s.client.post(
            "/v1/models/slow/predict",
            json={"features": [1, 0, 0, 0]},
            headers={"X-Request-Timeout-Ms": "50"},
        )
        metrics = (await s.client.get("/metrics")).text
    assert r.status_code == 504
    assert r.json()["error"] == {
        "code": "deadline_exceeded",
        "message": "the model did not answer before the deadline",
        "retryable": True,
    }
    assert 'inference_request_timeouts_total{model="slow",version="1"} 1.0' in metrics


async def test_client_cannot_extend_the_deadline(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    write_scripted_model(models_dir, "slow", delay_s=0.3)
    async with serve(request_timeout_ms=100) as s:
        r = await s.client.post(
            "/v1/models/slow/predict",
            json={"features": [1, 0, 0, 0]},
            headers={"X-Request-Timeout-Ms": "5000"},
        )
    assert r.status_code == 504


async def test_overload_is_shed_with_503_and_retry_after(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    write_scripted_model(
        models_dir, "slow", batching={"max_queue_size": 10, "max_batch_size": 1}, delay_s=0.05
    )
    async with serve(request_timeout_ms=5000) as s:
        results = await asyncio.gather(
            *(
                s.client.post("/v1/models/slow/predict", json={"features": [i, 0, 0, 0]})
                for i in range(30)
            )
        )
        metrics = (await s.client.get("/metrics")).text
    codes = [r.status_code for r in results]
    shed = [r for r in results if r.status_code == 503]
    assert codes.count(200) >= 8
    assert shed, codes
    assert set(codes) <= {200, 503}
    assert shed[0].headers["retry-after"] == "1"
    assert shed[0].json()["error"]["code"] == "overloaded"
    assert shed[0].json()["error"]["retryable"] is True
    assert (
        f'inference_queue_rejections_total{{model="slow",reason="shed",version="1"}} '
        f"{float(len(shed))}" in metrics
    )


async def test_a_failing_batch_is_a_500_that_says_so_and_serving_goes_on(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    write_scripted_model(models_dir, "flaky", fail_on=666.0)
    async with serve() as s:
        bad = await s.client.post("/v1/models/flaky/predict", json={"features": [666, 0, 0, 0]})
        good = await s.client.post("/v1/models/flaky/predict", json={"features": [1, 0, 0, 0]})
    assert bad.status_code == 500
    error = bad.json()["error"]
    assert error["code"] == "model_error"
    assert "cannot score a row whose first feature is 666.0" in error["message"]
    assert good.status_code == 200
    assert good.json()["label"] == "one"


async def test_disconnected_client_is_dropped_before_the_model(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    write_scripted_model(models_dir, "slow", delay_s=0.2)
    BATCHES.pop("slow", None)
    async with serve(request_timeout_ms=5000) as s:
        blocker = asyncio.ensure_future(
            s.client.post("/v1/models/slow/predict", json={"features": [1, 0, 0, 0]})
        )
        await asyncio.sleep(0.05)  # the model is busy with row 1

        body = orjson.dumps({"features": [2, 0, 0, 0]})
        messages = [{"type": "http.request", "body": body, "more_body": False}]
        gone = asyncio.Event()

        async def receive() -> dict[str, Any]:
            if messages:
                return messages.pop()
            await asyncio.sleep(0.02)
            gone.set()
            return {"type": "http.disconnect"}

        sent: list[dict[str, Any]] = []

        async def send(message: dict[str, Any]) -> None:
            sent.append(message)

        scope = {
            "type": "http",
            "method": "POST",
            "path": "/v1/models/slow/predict",
            "headers": [(b"content-type", b"application/json")],
            "query_string": b"",
        }
        await s.app(scope, receive, send)
        assert gone.is_set()
        assert (await blocker).status_code == 200
        await s.client.post("/v1/models/slow/predict", json={"features": [3, 0, 0, 0]})
        metrics = (await s.client.get("/metrics")).text
    assert sent == []  # nobody to answer
    seen = sum(BATCHES["slow"], [])
    assert 2.0 not in seen
    assert 3.0 in seen
    assert 'inference_client_disconnects_total{model="slow",version="1"} 1.0' in metrics


async def test_the_collector_threshold_is_raised_once_the_models_are_loaded(
    serve: Callable[..., Any],
) -> None:
    before = gc.get_threshold()
    try:
        async with serve(gc_threshold=12_345) as s:
            assert (
                await s.client.post("/predict", json={"features": [1, 2, 3, 4]})
            ).status_code == 200
            assert gc.get_threshold() == (12_345, *before[1:])
    finally:
        gc.set_threshold(*before)
