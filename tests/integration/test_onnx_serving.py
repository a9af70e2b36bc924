"""ONNX models served by the app: tabular rows through /predict, pictures through /classify."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper
from PIL import Image

from tests.support.vision import encode

RNG = np.random.default_rng(11)


def _write(folder: Path, toml: str, inputs: Any, weights: np.ndarray, flatten: bool) -> None:
    nodes = [helper.make_node("Flatten", ["x"], ["flat"], axis=1)] if flatten else []
    nodes += [
        helper.make_node("MatMul", ["flat" if flatten else "x", "W"], ["logits"]),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
    ]
    n_out = weights.shape[1]
    graph = helper.make_graph(
        nodes,
        "g",
        [inputs],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", n_out])],
        initializer=[numpy_helper.from_array(weights.astype(np.float32), "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    (folder / "1").mkdir(parents=True)
    onnx.save(model, folder / "1" / "model.onnx")
    (folder / "model.toml").write_text(toml)


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


async def test_a_tabular_onnx_model_through_the_hot_path(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    w = RNG.normal(size=(4, 3))
    _write(
        models_dir / "lin",
        'runtime = "onnx"\n[input]\nfeatures = ["a", "b", "c", "d"]\n'
        '[output]\nlabels = ["x", "y", "z"]\n',
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4]),
        w,
        flatten=False,
    )
    rows = RNG.normal(size=(3, 4))
    async with serve() as served:
        r = await served.client.post(
            "/v1/models/lin/predict", json={"instances": rows.round(3).tolist()}
        )
    assert r.status_code == 200, r.text
    got = [p["probabilities"] for p in r.json()["predictions"]]
    np.testing.assert_allclose(got, _softmax(rows.round(3) @ w), rtol=1e-4, atol=1e-6)


async def test_an_onnx_image_model_through_classify(
    serve: Callable[..., Any], models_dir: Path
) -> None:
    w = RNG.normal(size=(16, 2))
    _write(
        models_dir / "tiles",
        'runtime = "onnx"\n[input]\ntype = "image"\n'
        '[image]\nsize = 4\nchannels = "L"\nmean = [0.0]\nstd = [1.0]\n'
        '[output]\nlabels = ["dark", "light"]\n',
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 4, 4]),
        w,
        flatten=True,
    )
    pixels = RNG.integers(0, 256, size=(4, 4), dtype=np.uint8)
    async with serve() as served:
        r = await served.client.post(
            "/v1/models/tiles/classify", content=encode(Image.fromarray(pixels), "PNG")
        )
    assert r.status_code == 200, r.text
    expected = _softmax((pixels.reshape(16) / 255.0) @ w)
    got = {p["label"]: p["probability"] for p in r.json()["predictions"]}
    np.testing.assert_allclose([got["dark"], got["light"]], expected, rtol=1e-4)
