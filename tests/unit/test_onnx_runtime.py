"""ONNX Runtime: graphs built with onnx's helper API, answers checked against numpy."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from inferd.errors import ModelLoadError
from inferd.models.onnx import OnnxModel
from inferd.models.runtimes import RuntimeOptions, create_model, sample_batch, validate_output
from inferd.models.spec import ModelSpec

RNG = np.random.default_rng(7)
W = RNG.normal(size=(4, 3)).astype(np.float32)
B = RNG.normal(size=(3,)).astype(np.float32)


def _spec(**extra: Any) -> ModelSpec:
    data: dict[str, Any] = {
        "name": "lin",
        "runtime": "onnx",
        "input": {"features": ["a", "b", "c", "d"]},
        **extra,
    }
    return ModelSpec.model_validate(data)


def _save(
    path: Path,
    nodes: list[Any],
    outputs: list[Any],
    batch: Any = "N",
    dtype: int = TensorProto.FLOAT,
    extra: list[Any] | None = None,
) -> Path:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", dtype, [batch, 4])],
        outputs,
        initializer=[
            numpy_helper.from_array(
                W.astype(np.float64 if dtype == TensorProto.DOUBLE else np.float32), "W"
            ),
            numpy_helper.from_array(
                B.astype(np.float64 if dtype == TensorProto.DOUBLE else np.float32), "B"
            ),
            *(extra or []),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    onnx.save(model, path)
    return path


def _linear(dtype: int = TensorProto.FLOAT) -> list[Any]:
    return [
        helper.make_node("MatMul", ["x", "W"], ["xw"]),
        helper.make_node("Add", ["xw", "B"], ["logits"]),
    ]


def _softmax_classifier(path: Path, batch: Any = "N", dtype: int = TensorProto.FLOAT) -> Path:
    nodes = [
        *_linear(dtype),
        helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        helper.make_node("ArgMax", ["logits"], ["label"], axis=1, keepdims=0),
    ]
    outputs = [
        helper.make_tensor_value_info("label", TensorProto.INT64, [batch]),
        helper.make_tensor_value_info("probabilities", dtype, [batch, 3]),
    ]
    return _save(path, nodes, outputs, batch, dtype)


def _numpy_softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) @ W.astype(np.float64) + B
    z -= z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@pytest.mark.parametrize("dtype", [TensorProto.FLOAT, TensorProto.DOUBLE])
def test_a_softmax_classifier_answers_what_numpy_computes(tmp_path: Path, dtype: int) -> None:
    path = _softmax_classifier(tmp_path / "model.onnx", dtype=dtype)
    model = create_model(_spec(), 1, path, RuntimeOptions())
    model.load()
    assert isinstance(model, OnnxModel)
    assert model.output_name == "probabilities"  # the float output, not the int64 label
    assert model.classes() == [0, 1, 2]
    rows = RNG.normal(size=(5, 4))
    np.testing.assert_allclose(model.predict(rows), _numpy_softmax(rows), rtol=1e-5, atol=1e-6)
    batch = sample_batch(model.spec, 32)
    validate_output(model.spec, 1, model.classes(), batch, model.predict(batch))


def test_logits_become_probabilities_when_the_spec_says_so(tmp_path: Path) -> None:
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])]
    path = _save(tmp_path / "model.onnx", _linear(), outputs)
    plain = create_model(_spec(), 1, path)
    plain.load()
    batch = sample_batch(plain.spec, 4) + 1.0
    with pytest.raises(ModelLoadError, match="set \\[output\\] softmax = true"):
        validate_output(plain.spec, 1, plain.classes(), batch, plain.predict(batch))
    model = create_model(_spec(output={"softmax": True}), 1, path)
    model.load()
    rows = RNG.normal(size=(3, 4))
    np.testing.assert_allclose(model.predict(rows), _numpy_softmax(rows), rtol=1e-5, atol=1e-6)


def test_a_regressor_answers_one_value_per_row(tmp_path: Path) -> None:
    # y = sum of the three linear outputs, as (N, 1): MatMul with a column of ones.
    nodes = [*_linear(), helper.make_node("MatMul", ["logits", "ones"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1])]
    ones = numpy_helper.from_array(np.ones((3, 1), np.float32), "ones")
    path = _save(tmp_path / "model.onnx", nodes, outputs, extra=[ones])
    model = create_model(_spec(task="regression"), 1, path)
    model.load()
    rows = RNG.normal(size=(6, 4))
    expected = (rows @ W.astype(np.float64) + B).sum(axis=1)
    out = model.predict(rows)
    assert out.shape == (6,)
    np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-5)


def test_the_output_named_in_the_spec_is_read(tmp_path: Path) -> None:
    path = _softmax_classifier(tmp_path / "model.onnx")
    with pytest.raises(
        ModelLoadError, match="no output named 'nope' \\(outputs: label, probabilities\\)"
    ):
        create_model(_spec(output={"name": "nope"}), 1, path).load()
    with pytest.raises(ModelLoadError, match="output 'label' is tensor\\(int64\\), not a float"):
        create_model(_spec(output={"name": "label"}), 1, path).load()


def test_a_fixed_batch_axis_is_a_load_error_that_says_how_to_export(tmp_path: Path) -> None:
    path = _softmax_classifier(tmp_path / "model.onnx", batch=1)
    with pytest.raises(ModelLoadError, match=r"batch axis of input 'x' is fixed at 1.*dynamic"):
        create_model(_spec(), 1, path).load()


def test_schema_mismatches_and_corrupt_files_fail_the_load(tmp_path: Path) -> None:
    path = _softmax_classifier(tmp_path / "model.onnx")
    three = _spec(input={"features": ["a", "b", "c"]})
    with pytest.raises(
        ModelLoadError, match=r"shape \['N', 4\] but model\.toml describes \[batch, 3\]"
    ):
        create_model(three, 1, path).load()
    with pytest.raises(ModelLoadError, match=r"3 classes but model\.toml lists 2 labels"):
        create_model(_spec(output={"labels": ["x", "y"]}), 1, path).load()
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ModelLoadError, match="corrupt or not an ONNX model"):
        create_model(_spec(), 1, bad).load()


def test_session_threads_come_from_the_options(tmp_path: Path) -> None:
    path = _softmax_classifier(tmp_path / "model.onnx")
    model = create_model(
        _spec(), 1, path, RuntimeOptions(onnx_intra_op_threads=1, onnx_inter_op_threads=1)
    )
    model.load()
    assert isinstance(model, OnnxModel)
    options = model._session.get_session_options()
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (1, 1)
