"""A real ``inferd serve --grpc-port`` called with ``tritonclient.grpc``, as a Triton user would.

The Open Inference Protocol over gRPC: health, metadata, inference (raw tensors through the
client's own calls, typed contents through the client package's own service stub), the
classification and repository extensions, and the refusals as gRPC status codes; keys in the
``authorization`` metadata; the calls in the request metrics and the access log.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import numpy as np
import pytest
import tritonclient.grpc as triton
import tritonclient.grpc.aio as triton_aio
from tritonclient.grpc import service_pb2, service_pb2_grpc
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import Server, free_port, run_cli
from tests.support.models import write_scripted_model

ROWS = np.random.default_rng(13).uniform(0, 8, size=(6, 4)).round(3)


class GrpcServer(Server):
    """``inferd serve`` with the gRPC port on too."""

    def __init__(self, args: list[str], cwd: Path) -> None:
        self.grpc_port = free_port()
        super().__init__(["--grpc-port", str(self.grpc_port), *args], cwd)
        self.target = f"127.0.0.1:{self.grpc_port}"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_models: Path) -> Iterator[GrpcServer]:
    folder = tmp_path_factory.mktemp("grpc-e2e")
    models = folder / "models"
    shutil.copytree(demo_models, models)
    write_scripted_model(
        models, "slow", delay_s=0.4, batching={"max_batch_size": 1, "max_queue_size": 2}
    )
    config = folder / "inferd.toml"
    # A deadline that a busy test machine does not hit by accident; the JSON access log.
    config.write_text(
        f'models_dir = "{models}"\nrequest_timeout_ms = 5000\nlog_format = "json"\nworkers = 0\n'
    )
    started = GrpcServer(["--config", str(config)], folder)
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()


@pytest.fixture
def client(server: GrpcServer) -> Iterator[triton.InferenceServerClient]:
    connection = triton.InferenceServerClient(url=server.target)
    yield connection
    connection.close()


def v1_predict(server: Server, model: str, rows: np.ndarray) -> list[dict[str, Any]]:
    r = httpx.post(
        f"{server.url}/v1/models/{model}/predict", json={"instances": rows.tolist()}, timeout=10
    )
    assert r.status_code == 200, r.text
    predictions: list[dict[str, Any]] = r.json()["predictions"]
    return predictions


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    meta = client.get_server_metadata(as_json=True)
    assert meta["name"] == "inferd"
    assert set(meta["extensions"]) >= {"classification", "model_repository"}
    model = client.get_model_metadata("iris-forest", as_json=True)
    assert model["versions"] == ["1"]
    assert model["inputs"] == [{"name": "input", "datatype": "FP64", "shape": ["-1", "4"]}]
    assert [o["name"] for o in model["outputs"]] == ["probabilities", "label"]
    assert client.is_model_ready("iris")
    assert client.is_model_ready("iris", model_version="1")
    assert not client.is_model_ready("iris", model_version="9")
    assert not client.is_model_ready("nope")


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
def test_infer_matches_v1_predict(server: GrpcServer, datatype: str) -> None:
    rows = ROWS.astype(np.float32 if datatype == "FP32" else np.float64)
    expected = v1_predict(server, "iris-forest", rows.astype(np.float64))
    tensor = triton.InferInput("input", list(rows.shape), datatype)
    tensor.set_data_from_numpy(rows)  # raw_input_contents
    client = triton.InferenceServerClient(url=server.target)
    try:
        result = client.infer("iris-forest", [tensor], request_id="grpc-1")
        versioned = client.infer("iris-forest", [tensor], model_version="1")
    finally:
        client.close()
    response = result.get_response()
    assert (response.model_name, response.model_version, response.id) == (
        "iris-forest",
        "1",
        "grpc-1",
    )
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float64
    assert probabilities.tolist() == [row["probabilities"] for row in expected]
    assert [v.decode() for v in result.as_numpy("label")] == [row["label"] for row in expected]
    assert versioned.as_numpy("probabilities").tolist() == probabilities.tolist()


def test_typed_contents_and_top_classes(server: GrpcServer) -> None:
    """KServe's typed ``contents`` instead of raw bytes; the answer comes back typed too."""
    rows = ROWS[:2]
    expected = v1_predict(server, "iris", rows)
    request = service_pb2.ModelInferRequest(model_name="iris")
    given = request.inputs.add(name="input", datatype="FP64", shape=[2, 4])
    given.contents.fp64_contents.extend(rows.reshape(-1).tolist())
    top = request.outputs.add(name="probabilities")
    top.parameters["classification"].int64_param = 2
    request.outputs.add(name="label")
    with grpc.insecure_channel(server.target) as channel:
        answer = service_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=10)
    assert not answer.raw_output_contents
    cells, labels = answer.outputs
    assert (cells.datatype, list(cells.shape)) == ("BYTES", [2, 2])
    best = [c.decode() for c in cells.contents.bytes_contents][::2]
    assert [c.split(":")[2] for c in best] == [r["label"] for r in expected]
    assert [float(c.split(":")[0]) for c in best] == pytest.approx(
        [r["confidence"] for r in expected], abs=1e-6
    )
    assert [v.decode() for v in labels.contents.bytes_contents] == [r["label"] for r in expected]


def test_refusals_are_grpc_status_codes(client: triton.InferenceServerClient) -> None:
    wrong = triton.InferInput("input", [2, 3], "FP32")
    wrong.set_data_from_numpy(np.ones((2, 3), dtype=np.float32))
    row = triton.InferInput("input", [1, 4], "FP64")
    row.set_data_from_numpy(np.ones((1, 4)))
    with pytest.raises(InferenceServerException) as wrong_shape:
        client.infer("iris", [wrong])
    with pytest.raises(InferenceServerException) as unknown:
        client.infer("nope", [row])
    with pytest.raises(InferenceServerException) as no_metadata:
        client.get_model_metadata("nope")
    with pytest.raises(InferenceServerException) as late:
        client.infer("slow", [row], client_timeout=0.1)  # the gRPC deadline: 100 ms
    assert wrong_shape.value.status() == "StatusCode.INVALID_ARGUMENT"
    assert "has shape [2, 3]; model 'iris' takes [-1, 4]" in wrong_shape.value.message()
    assert unknown.value.status() == "StatusCode.NOT_FOUND"
    assert no_metadata.value.status() == "StatusCode.NOT_FOUND"
    assert late.value.status() == "StatusCode.DEADLINE_EXCEEDED"


async def test_a_burst_is_shed_with_unavailable(server: GrpcServer) -> None:
    """The slow model takes one row at a time and queues two: the rest is shed at once."""
    row = triton_aio.InferInput("input", [1, 4], "FP64")
    row.set_data_from_numpy(np.ones((1, 4)))
    async with triton_aio.InferenceServerClient(url=server.target) as client:
        results = await asyncio.gather(
            *(client.infer("slow", [row], client_timeout=10) for _ in range(8)),
            return_exceptions=True,
        )
    answered = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, InferenceServerException)]
    assert answered
    assert refused
    assert len(answered) + len(refused) == 8
    assert {r.status() for r in refused} == {"StatusCode.UNAVAILABLE"}
    assert "overloaded" in refused[0].message()


def test_repository_extension(client: triton.InferenceServerClient) -> None:
    index = client.get_model_repository_index(as_json=True)["models"]
    assert {(m["name"], m["state"]) for m in index} >= {("iris", "READY"), ("slow", "READY")}
    client.unload_model("iris-forest")
    assert not client.is_model_ready("iris-forest")
    client.load_model("iris-forest")
    assert client.is_model_ready("iris-forest")
    with pytest.raises(InferenceServerException) as missing:
        client.load_model("nope")
    assert missing.value.status() == "StatusCode.NOT_FOUND"


def test_metrics_and_access_log(server: GrpcServer, client: triton.InferenceServerClient) -> None:
    row = triton.InferInput("input", [1, 4], "FP64")
    row.set_data_from_numpy(ROWS[:1])
    client.infer("iris", [row], request_id="logged-1")
    metrics = httpx.get(f"{server.url}/metrics", timeout=5).text
    assert (
        'inference_requests_total{endpoint="/inference.GRPCInferenceService/ModelInfer",'
        'method="GRPC",status="200"}'
    ) in metrics
    end = time.monotonic() + 5
    while time.monotonic() < end:  # the access log is flushed every 100 ms
        lines = [json.loads(x) for x in server.output().splitlines() if x.startswith("{")]
        line = next((x for x in lines if x.get("request_id") == "logged-1"), None)
        if line is not None:
            break
        time.sleep(0.1)
    assert line is not None
    assert line["method"] == "GRPC"
    assert line["path"] == "/inference.GRPCInferenceService/ModelInfer"
    assert (line["status_code"], line["model"], line["model_version"]) == (200, "iris", "1")
    assert line["batch_size"] == 1


def test_keys_in_the_metadata(start_server: Any, tmp_path: Path, demo_models: Path) -> None:
    models = tmp_path / "models"
    shutil.copytree(demo_models, models)
    config = tmp_path / "inferd.toml"
    config.write_text(
        f'models_dir = "{models}"\nauth = "required"\nkey_cache_seconds = 0\nworkers = 0\n'
        "request_timeout_ms = 5000\n"
    )
    created = run_cli(
        "keys", "create", "--user", "gia", "--scopes", "predict", "--daily-tokens", "3",
        "--config", str(config), cwd=tmp_path,
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()
    grpc_port = free_port()
    server = start_server(["--config", str(config), "--grpc-port", str(grpc_port)])
    server.wait_ready()
    client = triton.InferenceServerClient(url=f"127.0.0.1:{grpc_port}")
    rows = triton.InferInput("input", [2, 4], "FP64")
    rows.set_data_from_numpy(ROWS[:2])
    bearer = {"authorization": f"Bearer {key}"}
    try:
        assert client.is_server_live()  # public, as /v2/health/live is
        with pytest.raises(InferenceServerException) as anonymous:
            client.infer("iris", [rows])
        answer = client.infer("iris", [rows], headers=bearer)
        with pytest.raises(InferenceServerException) as over_budget:
            client.infer("iris", [rows], headers=bearer)  # 2 of 3 tokens spent; 2 more asked
        with pytest.raises(InferenceServerException) as not_admin:
            client.get_model_repository_index(headers=bearer)
        with pytest.raises(InferenceServerException) as too_high:  # a normal key
            client.infer("iris", [rows], headers={**bearer, "x-inferd-priority": "high"})
    finally:
        client.close()
    assert anonymous.value.status() == "StatusCode.UNAUTHENTICATED"
    assert answer.as_numpy("label").shape == (2,)
    assert over_budget.value.status() == "StatusCode.RESOURCE_EXHAUSTED"
    assert not_admin.value.status() == "StatusCode.PERMISSION_DENIED"
    assert "'admin' scope" in not_admin.value.message()
    assert too_high.value.status() == "StatusCode.PERMISSION_DENIED"
    assert "may ask for priority normal or lower" in too_high.value.message()
