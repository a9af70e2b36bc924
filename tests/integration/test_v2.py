"""The Open Inference Protocol (V2) routes through the whole app, in-process."""

from __future__ import annotations

import asyncio
import gzip
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import joblib
import numpy as np
import orjson
import pytest

from inferd.http.v2_codec import deserialize_bytes
from tests.support.access import access_lines, capture_access_log
from tests.support.models import write_scripted_model

SETOSA = [5.1, 3.5, 1.4, 0.2]
VIRGINICA = [6.7, 3.0, 5.2, 2.3]
ROWS = np.random.default_rng(7).uniform(0, 8, size=(12, 4)).round(2).tolist()


@pytest.fixture
def serve(serve: Callable[..., Any]) -> Callable[..., Any]:
    """The app with a deadline that a busy test machine does not hit by accident."""

    def run(**overrides: Any) -> Any:
        overrides.setdefault("request_timeout_ms", 5000)
        return serve(**overrides)

    return run


def infer_doc(rows: list[list[Any]], datatype: str = "FP64", **extra: Any) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "input",
                "shape": [len(rows), len(rows[0])],
                "datatype": datatype,
                "data": rows,
            }
        ],
        **extra,
    }


def binary_body(rows: np.ndarray, datatype: str, **extra: Any) -> tuple[bytes, dict[str, str]]:
    raw = rows.tobytes()
    header = orjson.dumps(
        {
            "inputs": [
                {
                    "name": "input",
                    "shape": list(rows.shape),
                    "datatype": datatype,
                    "parameters": {"binary_data_size": len(raw)},
                }
            ],
            **extra,
        }
    )
    return header + raw, {"Inference-Header-Content-Length": str(len(header))}


def outputs_of(body: dict[str, Any]) -> dict[str, Any]:
    return {o["name"]: o for o in body["outputs"]}


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_server_metadata_and_health(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        meta = await s.client.get("/v2")
        live = await s.client.get("/v2/health/live")
        ready = await s.client.get("/v2/health/ready")
        model_ready = await s.client.get("/v2/models/iris/ready")
        version_ready = await s.client.get("/v2/models/iris/versions/1/ready")
    assert meta.status_code == 200
    assert meta.json()["name"] == "inferd"
    assert {"binary_tensor_data", "model_repository"} <= set(meta.json()["extensions"])
    assert meta.json()["version"]
    assert live.status_code == 200
    assert ready.status_code == 200
    assert ready.json() == {"ready": True}
    assert model_ready.status_code == 200
    assert model_ready.json()["ready"] is True
    assert version_ready.status_code == 200


async def test_not_ready_while_loading(serve: Callable[..., Any], models_dir: Path) -> None:
    write_scripted_model(models_dir, "slow", load_delay_s=1.5)
    async with serve(wait_ready=False, models=["slow"]) as s:
        ready = await s.client.get("/v2/health/ready")
        infer = await s.client.post("/v2/models/slow/infer", json=infer_doc([SETOSA]))
        await s.app.wait_ready(within=20)
        after = await s.client.get("/v2/health/ready")
    assert ready.status_code == 400  # the protocol's "false"
    assert ready.json() == {"ready": False}
    assert infer.status_code == 503
    assert "still loading" in infer.json()["error"]
    assert infer.headers["retry-after"] == "1"
    assert after.status_code == 200


async def test_model_metadata(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        meta = await s.client.get("/v2/models/iris")
        version = await s.client.get("/v2/models/iris/versions/1")
        unknown = await s.client.get("/v2/models/nope")
        no_version = await s.client.get("/v2/models/iris/versions/7")
        bad_version = await s.client.get("/v2/models/iris/versions/latest")
    assert meta.status_code == 200
    doc = meta.json()
    assert doc["name"] == "iris"
    assert doc["versions"] == ["1"]
    assert doc["platform"] == "sklearn"
    assert doc["inputs"] == [{"name": "input", "datatype": "FP64", "shape": [-1, 4]}]
    assert doc["outputs"] == [
        {"name": "probabilities", "datatype": "FP64", "shape": [-1, 3]},
        {"name": "label", "datatype": "BYTES", "shape": [-1]},
    ]
    assert doc["parameters"]["labels"] == ["setosa", "versicolor", "virginica"]
    assert version.json() == doc
    assert unknown.status_code == 404
    assert "'nope' is not served here" in unknown.json()["error"]
    assert no_version.status_code == 404
    assert "no version 7" in no_version.json()["error"]
    assert bad_version.status_code == 404
    assert "versions are positive integers" in bad_version.json()["error"]


async def test_json_infer_answers_as_v1_predict(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        v1 = await s.client.post("/v1/models/iris-forest/predict", json={"instances": ROWS})
        v2 = await s.client.post(
            "/v2/models/iris-forest/infer", json=infer_doc(ROWS, id="my-request")
        )
        nested = await s.client.post(
            "/v2/models/iris-forest/versions/1/infer",
            json={
                "inputs": [
                    {
                        "name": "input",
                        "shape": [12, 4],
                        "datatype": "FP64",
                        "data": [v for row in ROWS for v in row],
                    }
                ]
            },
        )
    assert v2.status_code == 200, v2.text
    assert v2.headers["content-type"] == "application/json"
    assert v2.headers["x-request-id"] == "my-request"
    body = v2.json()
    assert body["model_name"] == "iris-forest"
    assert body["model_version"] == "1"
    assert body["id"] == "my-request"
    out = outputs_of(body)
    expected = v1.json()["predictions"]
    assert out["probabilities"]["shape"] == [12, 3]
    assert out["probabilities"]["datatype"] == "FP64"
    got = np.array(out["probabilities"]["data"]).reshape(12, 3).tolist()
    assert got == [row["probabilities"] for row in expected]
    assert out["label"] == {
        "name": "label",
        "datatype": "BYTES",
        "shape": [12],
        "data": [row["label"] for row in expected],
    }
    assert nested.status_code == 200
    assert outputs_of(nested.json()) == out
    assert "id" not in nested.json()


async def test_binary_inputs_and_outputs(serve: Callable[..., Any]) -> None:
    rows32 = np.array(ROWS, dtype="<f4")
    body, headers = binary_body(
        rows32,
        "FP32",
        outputs=[
            {"name": "probabilities", "parameters": {"binary_data": True}},
            {"name": "label", "parameters": {"binary_data": True}},
        ],
    )
    async with serve() as s:
        v1 = await s.client.post(
            "/v1/models/iris/predict", json={"instances": rows32.astype(float).tolist()}
        )
        v2 = await s.client.post("/v2/models/iris/infer", content=body, headers=headers)
    assert v2.status_code == 200, v2.text
    assert v2.headers["content-type"] == "application/octet-stream"
    length = int(v2.headers["inference-header-content-length"])
    header = orjson.loads(v2.content[:length])
    out = outputs_of(header)
    size = out["probabilities"]["parameters"]["binary_data_size"]
    assert size == 12 * 3 * 8
    assert "data" not in out["probabilities"]
    tail = v2.content[length:]
    probs = np.frombuffer(tail[:size], dtype="<f8").reshape(12, 3)
    labels = deserialize_bytes(tail[size : size + out["label"]["parameters"]["binary_data_size"]])
    expected = v1.json()["predictions"]
    assert probs.tolist() == [row["probabilities"] for row in expected]
    assert [b.decode() for b in labels] == [row["label"] for row in expected]


async def test_every_numeric_input_datatype(serve: Callable[..., Any]) -> None:
    whole = [[5, 3, 1, 0], [7, 3, 5, 2]]
    async with serve() as s:
        v1 = await s.client.post("/v1/models/iris/predict", json={"instances": whole})
        expected = [row["label"] for row in v1.json()["predictions"]]
        for datatype in ("INT8", "INT16", "INT32", "INT64", "UINT8", "UINT16", "UINT32", "UINT64"):
            r = await s.client.post("/v2/models/iris/infer", json=infer_doc(whole, datatype))
            assert r.status_code == 200, (datatype, r.text)
            assert outputs_of(r.json())["label"]["data"] == expected
        for datatype, dtype in (("FP16", "<f2"), ("FP32", "<f4")):
            rows = np.array(whole, dtype=dtype)
            body, headers = binary_body(rows, datatype)
            r = await s.client.post("/v2/models/iris/infer", content=body, headers=headers)
            assert r.status_code == 200, (datatype, r.text)
            assert outputs_of(r.json())["label"]["data"] == expected


async def test_requested_outputs_and_classification(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        only_label = await s.client.post(
            "/v2/models/iris/infer",
            json=infer_doc([SETOSA, VIRGINICA], outputs=[{"name": "label"}]),
        )
        top = await s.client.post(
            "/v2/models/iris/infer",
            json=infer_doc(
                [SETOSA], outputs=[{"name": "probabilities", "parameters": {"classification": 2}}]
            ),
        )
        all_binary = await s.client.post(
            "/v2/models/iris/infer",
            json=infer_doc([SETOSA], parameters={"binary_data_output": True}),
        )
        v1 = await s.client.post("/v1/models/iris/predict", json={"features": SETOSA})
    assert [o["name"] for o in only_label.json()["outputs"]] == ["label"]
    assert only_label.json()["outputs"][0]["data"] == ["setosa", "virginica"]
    (cell,) = top.json()["outputs"]
    assert cell["datatype"] == "BYTES"
    assert cell["shape"] == [1, 2]
    best, second = cell["data"]
    score, index, label = best.split(":")
    assert (index, label) == ("0", "setosa")
    assert float(score) == pytest.approx(v1.json()["confidence"], abs=1e-6)
    assert float(second.split(":")[0]) < float(score)
    length = int(all_binary.headers["inference-header-content-length"])
    assert all(
        "binary_data_size" in o["parameters"]
        for o in orjson.loads(all_binary.content[:length])["outputs"]
    )


@pytest.mark.parametrize(
    ("doc", "status", "message"),
    [
        (infer_doc([[1.0, 2.0, 3.0]]), 400, "has shape [1, 3]; model 'iris' takes [-1, 4]"),
        (
            {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP64", "data": SETOSA}]},
            400,
            "takes one input, 'input'",
        ),
        (
            {"inputs": [{"name": "input", "shape": [4], "datatype": "BYTES", "data": ["a"] * 4}]},
            400,
            "must be numeric",
        ),
        (
            {"inputs": [{"name": "input", "shape": [1, 4], "datatype": "FP64", "data": [1, 2]}]},
            400,
            "data has 2 elements; shape [1, 4] needs 4",
        ),
        (infer_doc([SETOSA], outputs=[{"name": "logits"}]), 400, "has no output 'logits'"),
        (
            {"inputs": [{"name": "input", "shape": [0, 4], "datatype": "FP64", "data": []}]},
            400,
            "has no rows",
        ),
        (infer_doc([SETOSA] * 9), 413, "9 rows in one request; the limit is 8"),
    ],
)
async def test_bad_requests_get_the_protocol_error(
    serve: Callable[..., Any], doc: dict[str, Any], status: int, message: str
) -> None:
    async with serve(max_instances=8) as s:
        r = await s.client.post("/v2/models/iris/infer", json=doc)
    assert r.status_code == status
    assert set(r.json()) == {"error"}
    assert message in r.json()["error"]


async def test_other_refusals(serve: Callable[..., Any]) -> None:
    nan = np.array([[np.nan, 1.0, 1.0, 1.0]], dtype="<f8")
    body, headers = binary_body(nan, "FP64")
    async with serve(max_body_bytes=4096) as s:
        not_finite = await s.client.post("/v2/models/iris/infer", content=body, headers=headers)
        not_json = await s.client.post("/v2/models/iris/infer", content=b"{nope")
        too_big = await s.client.post("/v2/models/iris/infer", json=infer_doc([SETOSA] * 400))
        unknown = await s.client.post("/v2/models/nope/infer", json=infer_doc([SETOSA]))
        bad_header = await s.client.post(
            "/v2/models/iris/infer",
            content=orjson.dumps(infer_doc([SETOSA])),
            headers={"Inference-Header-Content-Length": "lots"},
        )
    assert not_finite.status_code == 400
    assert "finite" in not_finite.json()["error"]
    assert not_json.status_code == 400
    assert "not valid JSON" in not_json.json()["error"]
    assert too_big.status_code == 413
    assert "over the limit of 4096 bytes" in too_big.json()["error"]
    assert unknown.status_code == 404
    assert bad_header.status_code == 400


async def test_compressed_request_body(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        r = await s.client.post(
            "/v2/models/iris/infer",
            content=gzip.compress(orjson.dumps(infer_doc([SETOSA]))),
            headers={"Content-Encoding": "gzip"},
        )
        bomb = await s.client.post(
            "/v2/models/iris/infer",
            content=gzip.compress(b" " * 2_000_000),
            headers={"Content-Encoding": "gzip"},
        )
        brotli = await s.client.post(
            "/v2/models/iris/infer", content=b"...", headers={"Content-Encoding": "br"}
        )
    assert r.status_code == 200
    assert outputs_of(r.json())["label"]["data"] == ["setosa"]
    assert bomb.status_code == 413
    assert brotli.status_code == 415
    assert "use gzip, deflate or none" in brotli.json()["error"]


async def test_deadline_and_overload(serve: Callable[..., Any], models_dir: Path) -> None:
    write_scripted_model(
        models_dir, "slow", delay_s=0.3, batching={"max_batch_size": 1, "max_queue_size": 4}
    )
    async with serve(models=["slow"], request_timeout_ms=2000) as s:
        late = await s.client.post(
            "/v2/models/slow/infer",
            json=infer_doc([SETOSA]),
            headers={"X-Request-Timeout-Ms": "50"},
        )
        late_by_parameter = await s.client.post(
            "/v2/models/slow/infer", json=infer_doc([SETOSA], parameters={"timeout": 50_000})
        )
        await asyncio.sleep(0.7)  # the abandoned batches finish
        burst = await asyncio.gather(
            *(s.client.post("/v2/models/slow/infer", json=infer_doc([SETOSA])) for _ in range(8))
        )
        metrics = (await s.client.get("/metrics")).text
    assert late.status_code == 504
    assert "deadline" in late.json()["error"]
    assert late_by_parameter.status_code == 504
    codes = sorted(r.status_code for r in burst)
    assert 200 in codes
    assert 503 in codes
    shed = next(r for r in burst if r.status_code == 503)
    assert "overloaded" in shed.json()["error"]
    assert int(shed.headers["retry-after"]) >= 1
    assert 'inference_request_timeouts_total{model="slow",version="1"} 2.0' in metrics


async def test_regression_model(serve: Callable[..., Any], models_dir: Path) -> None:
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LinearRegression

    x, _ = load_iris(return_X_y=True)
    folder = models_dir / "petal"
    (folder / "1").mkdir(parents=True)
    joblib.dump(LinearRegression().fit(x[:, :3], x[:, 3]), folder / "1" / "model.joblib")
    (folder / "model.toml").write_text(
        'runtime = "sklearn"\ntask = "regression"\n[input]\nfeatures = ["a", "b", "c"]\n'
    )
    rows = [row[:3] for row in ROWS]
    async with serve(models=["petal"]) as s:
        meta = (await s.client.get("/v2/models/petal")).json()
        v1 = await s.client.post("/v1/models/petal/predict", json={"instances": rows})
        v2 = await s.client.post("/v2/models/petal/infer", json=infer_doc(rows))
        named = await s.client.post(
            "/v2/models/petal/infer", json=infer_doc(rows, outputs=[{"name": "predictions"}])
        )
    assert meta["outputs"] == [{"name": "predictions", "datatype": "FP64", "shape": [-1]}]
    assert v2.content == named.content  # the common answer's writer and the general one agree
    (out,) = v2.json()["outputs"]
    assert out["name"] == "predictions"
    assert out["shape"] == [12]
    assert out["data"] == [row["prediction"] for row in v1.json()["predictions"]]


async def test_each_version_answers_for_itself(serve: Callable[..., Any], models_dir: Path) -> None:
    # iris version 2 is the forest; serve both versions, 2 by default.
    shutil.copytree(models_dir / "iris-forest" / "1", models_dir / "iris" / "2")
    toml = models_dir / "iris" / "model.toml"
    toml.write_text(toml.read_text() + "\n[versions]\ncount = 2\n")
    one = joblib.load(models_dir / "iris" / "1" / "model.joblib")
    two = joblib.load(models_dir / "iris" / "2" / "model.joblib")
    async with serve(models=["iris"]) as s:
        meta = (await s.client.get("/v2/models/iris")).json()
        default = await s.client.post("/v2/models/iris/infer", json=infer_doc(ROWS))
        first = await s.client.post("/v2/models/iris/versions/1/infer", json=infer_doc(ROWS))
        second = await s.client.post("/v2/models/iris/versions/2/infer", json=infer_doc(ROWS))
        missing = await s.client.post("/v2/models/iris/versions/3/infer", json=infer_doc(ROWS))
    assert meta["versions"] == ["1", "2"]
    assert default.json()["model_version"] == "2"
    assert first.json()["model_version"] == "1"

    def probs(r: Any) -> np.ndarray:
        return np.array(outputs_of(r.json())["probabilities"]["data"]).reshape(-1, 3)

    np.testing.assert_allclose(probs(first), one.predict_proba(np.array(ROWS)), atol=1e-9)
    np.testing.assert_allclose(probs(second), two.predict_proba(np.array(ROWS)), atol=1e-9)
    assert probs(default).tolist() == probs(second).tolist()
    assert missing.status_code == 404
    assert "no version 3" in missing.json()["error"]


async def test_repository_index_load_and_unload(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        index = await s.client.post("/v2/repository/index")
        ready_only = await s.client.post("/v2/repository/index", json={"ready": True})
        unloaded = await s.client.post(
            "/v2/repository/models/iris-forest/unload",
            json={"parameters": {"unload_dependents": False}},
        )
        after_unload = await s.client.post("/v2/models/iris-forest/infer", json=infer_doc([SETOSA]))
        index_after = (await s.client.post("/v2/repository/index")).json()
        loaded = await s.client.post("/v2/repository/models/iris-forest/load", json={})
        after_load = await s.client.post("/v2/models/iris-forest/infer", json=infer_doc([SETOSA]))
        with_config = await s.client.post(
            "/v2/repository/models/iris/load", json={"parameters": {"config": "{}"}}
        )
        unknown = await s.client.post("/v2/repository/models/nope/load")
        unload_unknown = await s.client.post("/v2/repository/models/nope/unload")
    assert index.status_code == 200
    rows = {(r["name"], r["version"]): r for r in index.json()}
    assert rows[("iris", "1")]["state"] == "READY"
    assert rows[("iris-forest", "1")]["state"] == "READY"
    assert {r["name"] for r in ready_only.json()} == {"iris", "iris-forest"}
    assert unloaded.status_code == 200
    assert after_unload.status_code == 404
    states = {(r["name"], r["version"]): r["state"] for r in index_after}
    assert states[("iris-forest", "1")] == "UNAVAILABLE"
    assert states[("iris", "1")] == "READY"
    assert loaded.status_code == 200
    assert after_load.status_code == 200
    assert with_config.status_code == 400
    assert "not supported" in with_config.json()["error"]
    assert unknown.status_code == 404
    assert "error" in unknown.json()
    assert unload_unknown.status_code == 404


async def test_load_swaps_versions_under_load_without_a_failure(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    async with serve(models=["iris"]) as s:
        shutil.copytree(models_dir / "iris-forest" / "1", models_dir / "iris" / "2")
        stop = asyncio.Event()
        answers: list[tuple[int, str | None]] = []

        async def client() -> None:
            while not stop.is_set():
                r = await s.client.post("/v2/models/iris/infer", json=infer_doc([SETOSA]))
                answers.append((r.status_code, r.json().get("model_version")))

        clients = [asyncio.create_task(client()) for _ in range(4)]
        await asyncio.sleep(0.2)
        loaded = await s.client.post("/v2/repository/models/iris/load")
        await asyncio.sleep(0.2)
        stop.set()
        await asyncio.gather(*clients)
        meta = (await s.client.get("/v2/models/iris")).json()
    assert loaded.status_code == 200
    assert {status for status, _ in answers} == {200}
    assert answers[0][1] == "1"
    assert answers[-1][1] == "2"
    assert meta["versions"] == ["2"]


async def test_scopes_budget_and_refund(serve: Callable[..., Any], models_dir: Path) -> None:
    write_scripted_model(models_dir, "slow", delay_s=0.3)
    async with serve(auth="required", models=["iris", "slow"]) as s:
        predict, _ = await s.app.keys.create("ann", ["predict"], daily_tokens=5)
        admin, _ = await s.app.keys.create("root", ["admin"])
        public = [await s.client.get(p) for p in ("/v2", "/v2/health/live", "/v2/health/ready")]
        anonymous = await s.client.get("/v2/models/iris")
        metadata = await s.client.get("/v2/models/iris", headers=bearer(predict))
        late = await s.client.post(
            "/v2/models/slow/infer",
            json=infer_doc([SETOSA] * 3),
            headers={**bearer(predict), "X-Request-Timeout-Ms": "50"},
        )
        first = await s.client.post(
            "/v2/models/iris/infer", json=infer_doc([SETOSA] * 3), headers=bearer(predict)
        )
        second = await s.client.post(
            "/v2/models/iris/infer", json=infer_doc([SETOSA] * 3), headers=bearer(predict)
        )
        index_as_user = await s.client.post("/v2/repository/index", headers=bearer(predict))
        index_as_admin = await s.client.post("/v2/repository/index", headers=bearer(admin))
        usage = (await s.client.get("/v1/usage", headers=bearer(predict))).json()
    assert [r.status_code for r in public] == [200, 200, 200]
    assert anonymous.status_code == 401
    assert metadata.status_code == 200
    assert late.status_code == 504  # not served: its 3 rows are given back
    assert first.status_code == 200
    assert '"daily";r=2;' in first.headers["ratelimit"]
    assert second.status_code == 429
    assert "daily token budget" in second.json()["error"]
    assert index_as_user.status_code == 403
    assert index_as_admin.status_code == 200
    assert usage["tokens_used_today"] == 3


async def test_access_log_and_metrics(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        sink = capture_access_log(s.app)
        await s.client.post("/v2/models/iris/infer", json=infer_doc([SETOSA, VIRGINICA]))
        metrics = (await s.client.get("/metrics")).text
        lines = access_lines(s.app, sink)
    line = next(x for x in lines if x["path"] == "/v2/models/iris/infer")
    assert line["status_code"] == 200
    assert line["model"] == "iris"
    assert line["model_version"] == "1"
    assert line["batch_size"] == 2
    assert line["queue_depth"] == 0
    assert (
        'inference_requests_total{endpoint="/v2/models/{name}/infer",method="POST",status="200"}'
        in metrics
    )
    assert 'inference_request_latency_seconds_count{model="iris",version="1"} 1.0' in metrics


async def test_text_models_and_other_routes_are_refused(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    folder = models_dir / "writer"
    (folder / "1").mkdir(parents=True)
    (folder / "model.toml").write_text(
        'runtime = "python"\ntask = "text-generation"\n'
        'class = "tests.support.models:ScriptedStreamer"\n'
    )
    async with serve(models=["iris", "writer"], workers=0) as s:
        meta = await s.client.get("/v2/models/writer")
        infer = await s.client.post("/v2/models/writer/infer", json=infer_doc([SETOSA]))
        stats = await s.client.get("/v2/models/iris/stats")
    assert meta.status_code == 200
    assert meta.json()["inputs"] == []
    assert meta.json()["parameters"]["input_type"] == "text"
    assert infer.status_code == 400
    assert "generates text" in infer.json()["error"]
    assert "POST /v1/requests" in infer.json()["error"]
    assert stats.status_code == 404
    assert stats.json() == {"error": "GET /v2/models/iris/stats is not served by inferd's V2 API"}


class TinyImageModel:
    """Two classes from the mean of a prepared 1x8x8 picture: dark below 0, bright above."""

    def __init__(self, spec: Any, version: int, path: Path) -> None:
        self.spec = spec
        self.version = version

    def load(self) -> None:
        pass

    def predict(self, batch: np.ndarray) -> np.ndarray:
        assert batch.dtype == np.float32
        bright = 1.0 / (1.0 + np.exp(-batch.reshape(batch.shape[0], -1).mean(axis=1)))
        return np.stack([1.0 - bright, bright], axis=1).astype(np.float64)

    def classes(self) -> list[int | str]:
        return [0, 1]

    def unload(self) -> None:
        pass


async def test_image_models_take_prepared_pictures(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    folder = models_dir / "shade"
    (folder / "1").mkdir(parents=True)
    (folder / "model.toml").write_text(
        'runtime = "python"\nclass = "tests.integration.test_v2:TinyImageModel"\n'
        '[input]\ntype = "image"\n[image]\nsize = 8\nchannels = "L"\n'
        '[output]\nlabels = ["dark", "bright"]\n'
    )
    pictures = np.stack([np.full((1, 8, 8), -1.0), np.full((1, 8, 8), 0.5)]).astype("<f4")
    body, headers = binary_body(pictures, "FP32")
    async with serve(models=["shade"]) as s:
        meta = (await s.client.get("/v2/models/shade")).json()
        r = await s.client.post("/v2/models/shade/infer", content=body, headers=headers)
        wrong = await s.client.post("/v2/models/shade/infer", json=infer_doc([[0.0] * 16], "FP32"))
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 1, 8, 8]}]
    assert meta["parameters"]["image"]["channels"] == "L"
    assert r.status_code == 200, r.text
    out = outputs_of(r.json())
    assert out["label"]["data"] == ["dark", "bright"]
    expected = TinyImageModel(None, 1, folder).predict(pictures)
    assert out["probabilities"]["data"] == expected.reshape(-1).tolist()
    assert wrong.status_code == 400
    assert "takes [-1, 1, 8, 8]" in wrong.json()["error"]
    assert "/v1/models/shade/classify" in wrong.json()["error"]


async def test_the_common_answer_is_the_general_one(serve: Callable[..., Any]) -> None:
    """A request naming no outputs gets its answer from a shorter writer: the same bytes."""
    doc = infer_doc([SETOSA, VIRGINICA], id="same-1")
    async with serve() as s:
        common = await s.client.post("/v2/models/iris/infer", json=doc)
        named = await s.client.post(
            "/v2/models/iris/infer",
            json={**doc, "outputs": [{"name": "probabilities"}, {"name": "label"}]},
        )
        flat = await s.client.post(  # flat data: the common request's reader too
            "/v2/models/iris/infer",
            json={
                "id": "same-1",
                "inputs": [
                    {
                        "name": "input",
                        "shape": [2, 4],
                        "datatype": "FP64",
                        "data": SETOSA + VIRGINICA,
                    }
                ],
                "parameters": {"binary_data_output": False},
            },
        )
    assert common.status_code == 200
    assert common.content == named.content == flat.content
    assert outputs_of(common.json())["label"]["data"] == ["setosa", "virginica"]


async def test_infer_is_on_the_lean_path_and_documented(serve: Callable[..., Any]) -> None:
    async with serve() as s:
        ok = await s.client.post(
            "/v2/models/iris/versions/1/infer",
            json=infer_doc([SETOSA]),
            headers={"X-Request-ID": "lean-1"},
        )
        not_a_version = await s.client.post(
            "/v2/models/iris/versions/one/infer", json=infer_doc([SETOSA])
        )
        schema = (await s.client.get("/openapi.json")).json()
    assert ok.status_code == 200
    assert ok.headers["x-request-id"] == "lean-1"
    assert ok.headers["content-length"] == str(len(ok.content))
    assert not_a_version.status_code == 404
    assert "versions are positive integers" in not_a_version.json()["error"]
    for path in ("/v2/models/{name}/infer", "/v2/models/{name}/versions/{version}/infer"):
        operation = schema["paths"][path]["post"]
        body = operation["requestBody"]["content"]
        assert set(body) == {"application/json", "application/octet-stream"}
        assert "$ref" not in str(body)  # inlined: nothing points outside the document
        assert body["application/json"]["schema"]["properties"]["inputs"]["minItems"] == 1
        responses = operation["responses"]
        # (429 only where keys are on: its limits are a key's)
        assert {"200", "400", "404", "413", "415", "503", "504"} <= set(responses)
        assert "application/octet-stream" in responses["200"]["content"]
        error = responses["400"]["content"]["application/json"]["schema"]["$ref"]
        assert error == "#/components/schemas/V2ErrorBody"
    assert schema["components"]["schemas"]["V2ErrorBody"]["properties"]["error"]["type"] == (
        "string"
    )
