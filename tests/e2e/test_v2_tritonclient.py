"""A real ``inferd serve`` called with ``tritonclient.http``, exactly as a Triton user would."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from tests.e2e.conftest import Server

ROWS = np.random.default_rng(11).uniform(0, 8, size=(10, 4)).round(3)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, demo_models: Path) -> Iterator[Server]:
    """One server for the module: the tests leave its models as they found them."""
    folder = tmp_path_factory.mktemp("v2-e2e")
    shutil.copytree(demo_models, folder / "models")
    config = folder / "inferd.toml"
    # A deadline that a busy test machine does not hit by accident.
    config.write_text(f'models_dir = "{folder / "models"}"\nrequest_timeout_ms = 5000\n')
    started = Server(["--config", str(config)], folder)
    try:
        started.wait_ready()
        yield started
    finally:
        started.stop()


@pytest.fixture
def client(server: Server) -> Iterator[triton.InferenceServerClient]:
    connection = triton.InferenceServerClient(url=f"127.0.0.1:{server.port}")
    yield connection
    connection.close()


def v1_predict(server: Any, model: str, rows: np.ndarray) -> list[dict[str, Any]]:
    r = httpx.post(
        f"{server.url}/v1/models/{model}/predict", json={"instances": rows.tolist()}, timeout=10
    )
    assert r.status_code == 200, r.text
    predictions: list[dict[str, Any]] = r.json()["predictions"]
    return predictions


def test_health_and_metadata(client: triton.InferenceServerClient) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    server_meta = client.get_server_metadata()
    assert server_meta["name"] == "inferd"
    assert "binary_tensor_data" in server_meta["extensions"]
    meta = client.get_model_metadata("iris-forest")
    assert meta["name"] == "iris-forest"
    assert meta["versions"] == ["1"]
    assert meta["inputs"] == [{"name": "input", "datatype": "FP64", "shape": [-1, 4]}]
    assert [o["name"] for o in meta["outputs"]] == ["probabilities", "label"]
    assert client.get_model_metadata("iris", model_version="1")["name"] == "iris"
    assert client.is_model_ready("iris")
    assert client.is_model_ready("iris", model_version="1")
    assert not client.is_model_ready("iris", model_version="9")
    assert not client.is_model_ready("nope")


@pytest.mark.parametrize("datatype", ["FP32", "FP64"])
@pytest.mark.parametrize("binary_in", [True, False])
@pytest.mark.parametrize("binary_out", [True, False])
def test_infer_matches_v1_predict(
    server: Any,
    client: triton.InferenceServerClient,
    datatype: str,
    binary_in: bool,
    binary_out: bool,
) -> None:
    rows = ROWS.astype(np.float32 if datatype == "FP32" else np.float64)
    expected = v1_predict(server, "iris-forest", rows.astype(np.float64))
    tensor = triton.InferInput("input", list(rows.shape), datatype)
    tensor.set_data_from_numpy(rows, binary_data=binary_in)
    outputs = [
        triton.InferRequestedOutput("probabilities", binary_data=binary_out),
        triton.InferRequestedOutput("label", binary_data=binary_out),
    ]
    result = client.infer("iris-forest", [tensor], outputs=outputs, request_id="triton-1")
    response = result.get_response()
    assert response["model_name"] == "iris-forest"
    assert response["model_version"] == "1"
    assert response["id"] == "triton-1"
    probabilities = result.as_numpy("probabilities")
    assert probabilities.dtype == np.float64
    assert probabilities.shape == (10, 3)
    assert probabilities.tolist() == [row["probabilities"] for row in expected]
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
    assert labels == [row["label"] for row in expected]


def test_infer_with_defaults_version_and_top_classes(
    server: Any, client: triton.InferenceServerClient
) -> None:
    rows = ROWS[:3]
    expected = v1_predict(server, "iris", rows)
    tensor = triton.InferInput("input", list(rows.shape), "FP64")
    tensor.set_data_from_numpy(rows)  # binary, and no outputs named: all of them, binary
    result = client.infer("iris", [tensor], model_version="1")
    assert result.as_numpy("probabilities").tolist() == [r["probabilities"] for r in expected]
    for algorithm in ("gzip", "deflate"):
        compressed = client.infer(
            "iris",
            [tensor],
            request_compression_algorithm=algorithm,
            response_compression_algorithm=algorithm,
        )
        assert compressed.as_numpy("label").tolist() == [r["label"].encode() for r in expected]
    top = client.infer(
        "iris", [tensor], outputs=[triton.InferRequestedOutput("probabilities", class_count=1)]
    )
    cells = [v.decode() for v in top.as_numpy("probabilities").reshape(-1)]
    assert [c.split(":")[2] for c in cells] == [r["label"] for r in expected]
    assert [float(c.split(":")[0]) for c in cells] == pytest.approx(
        [r["confidence"] for r in expected], abs=1e-6
    )


def test_errors_reach_the_client(client: triton.InferenceServerClient) -> None:
    tensor = triton.InferInput("input", [2, 3], "FP32")
    tensor.set_data_from_numpy(np.ones((2, 3), dtype=np.float32))
    with pytest.raises(InferenceServerException) as wrong_shape:
        client.infer("iris", [tensor])
    assert wrong_shape.value.status() == "400"
    assert "has shape [2, 3]; model 'iris' takes [-1, 4]" in wrong_shape.value.message()
    with pytest.raises(InferenceServerException) as unknown:
        client.get_model_metadata("nope")
    assert unknown.value.status() == "404"
    assert "'nope' is not served here" in unknown.value.message()


def test_repository_index_unload_and_load(client: triton.InferenceServerClient) -> None:
    index = client.get_model_repository_index()
    assert {(m["name"], m["state"]) for m in index} == {
        ("iris", "READY"),
        ("iris-forest", "READY"),
    }
    client.unload_model("iris-forest")
    assert not client.is_model_ready("iris-forest")
    states = {m["name"]: m["state"] for m in client.get_model_repository_index()}
    assert states == {"iris": "READY", "iris-forest": "UNAVAILABLE"}
    client.load_model("iris-forest")
    assert client.is_model_ready("iris-forest")
    tensor = triton.InferInput("input", [1, 4], "FP64")
    tensor.set_data_from_numpy(np.array([[6.7, 3.0, 5.2, 2.3]]))
    label = client.infer("iris-forest", [tensor]).as_numpy("label")
    assert label.tolist() == [b"virginica"]
    with pytest.raises(InferenceServerException) as missing:
        client.load_model("nope")
    assert missing.value.status() == "404"
