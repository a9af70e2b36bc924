"""Open Inference Protocol (V2) JSON tensors to and from numpy arrays."""

from __future__ import annotations

import numpy as np
import pytest

from inferd.client._tensors import decode_tensor, encode_inputs, encode_tensor


def test_arrays_round_trip_with_shape_and_datatype() -> None:
    for array in (
        np.arange(6, dtype=np.float32).reshape(2, 3),
        np.array([[1, -2], [3, 4]], dtype=np.int64),
        np.array([True, False]),
        np.array([0.5], dtype=np.float16),
    ):
        tensor = encode_tensor("x", array)
        assert tensor["shape"] == list(array.shape)
        assert len(tensor["data"]) == array.size  # flat, row-major
        back = decode_tensor(tensor)
        assert back.dtype == array.dtype and np.array_equal(back, array)


def test_strings_are_bytes_tensors() -> None:
    tensor = encode_tensor("text", ["a", b"b"])
    assert tensor == {"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", "b"]}
    assert decode_tensor(tensor).tolist() == ["a", "b"]


def test_inputs_by_name_by_position_and_as_tensors() -> None:
    rows = [[5.1, 3.5], [6.0, 3.0]]
    assert [t["name"] for t in encode_inputs({"a": rows, "b": [1]})] == ["a", "b"]
    named = encode_inputs([rows, [1]], names=["features"])
    assert [t["name"] for t in named] == ["features", "input-1"]
    assert named[0]["datatype"] == "FP64" and named[0]["shape"] == [2, 2]
    raw = {"name": "t", "shape": [2], "datatype": "FP32", "data": np.array([1.0, 2.0])}
    assert encode_inputs([raw]) == [
        {"name": "t", "shape": [2], "datatype": "FP32", "data": [1.0, 2.0]}
    ]


def test_nested_output_data_and_bad_types() -> None:
    nested = {"name": "y", "shape": [2, 2], "datatype": "INT32", "data": [[1, 2], [3, 4]]}
    assert decode_tensor(nested).tolist() == [[1, 2], [3, 4]]
    with pytest.raises(ValueError, match="complex128 has no V2 datatype"):
        encode_tensor("z", np.array([1j]))
    with pytest.raises(ValueError, match="unknown V2 datatype 'FP8'"):
        decode_tensor({"name": "y", "shape": [1], "datatype": "FP8", "data": [1]})
