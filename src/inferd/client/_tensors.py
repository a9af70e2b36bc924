"""Open Inference Protocol (V2) JSON tensors to and from numpy arrays.

A tensor is ``{"name", "shape", "datatype", "data"}`` with ``data`` flattened in row-major
order; ``BYTES`` tensors carry strings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

__all__ = ["decode_tensor", "encode_inputs", "encode_tensor"]

_TO_V2: dict[str, str] = {
    "bool": "BOOL",
    "uint8": "UINT8",
    "uint16": "UINT16",
    "uint32": "UINT32",
    "uint64": "UINT64",
    "int8": "INT8",
    "int16": "INT16",
    "int32": "INT32",
    "int64": "INT64",
    "float16": "FP16",
    "float32": "FP32",
    "float64": "FP64",
}
_FROM_V2: dict[str, Any] = {v: np.dtype(k) for k, v in _TO_V2.items()}


def encode_tensor(name: str, value: Any, datatype: str | None = None) -> dict[str, Any]:
    """A V2 input tensor from anything numpy can read (an array, nested lists, a scalar)."""
    array = np.asarray(value)
    if datatype is None:
        if array.dtype.kind in "USO":
            datatype = "BYTES"
        else:
            found = _TO_V2.get(array.dtype.name)
            if found is None:
                raise ValueError(
                    f"input {name!r}: numpy dtype {array.dtype} has no V2 datatype; "
                    "convert it (e.g. to float32) first"
                )
            datatype = found
    if datatype == "BYTES":
        data: list[Any] = [
            v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in array.ravel().tolist()
        ]
    else:
        if datatype not in _FROM_V2:
            raise ValueError(f"input {name!r}: unknown V2 datatype {datatype!r}")
        data = array.astype(_FROM_V2[datatype], copy=False).ravel().tolist()
    return {"name": name, "shape": list(array.shape), "datatype": datatype, "data": data}


def encode_inputs(
    inputs: Mapping[str, Any] | Sequence[Any], names: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """V2 ``inputs``: a mapping name → array; or a list of tensors (dicts, sent as they are,
    numpy data flattened) or of arrays, named by ``names`` (the model's declared inputs, in
    order) or ``input-0``, ``input-1``..."""
    if isinstance(inputs, Mapping):
        return [encode_tensor(str(name), value) for name, value in inputs.items()]
    tensors: list[dict[str, Any]] = []
    for i, item in enumerate(inputs):
        if isinstance(item, Mapping):
            tensor = dict(item)
            if isinstance(tensor.get("data"), np.ndarray):
                encoded = encode_tensor(str(tensor["name"]), tensor["data"], tensor.get("datatype"))
                tensor = {**encoded, **{k: v for k, v in tensor.items() if k != "data"}}
                tensor["data"] = encoded["data"]
            tensors.append(tensor)
        else:
            name = names[i] if names is not None and i < len(names) else f"input-{i}"
            tensors.append(encode_tensor(name, item))
    return tensors


def decode_tensor(tensor: Mapping[str, Any]) -> np.ndarray:
    """A V2 output tensor as a numpy array of its shape and datatype."""
    datatype = str(tensor.get("datatype", "FP32")).upper()
    shape = [int(d) for d in tensor.get("shape", [])]
    data = tensor.get("data", [])
    if datatype == "BYTES":
        array = np.asarray(data, dtype=object)
    elif datatype in _FROM_V2:
        array = np.asarray(data, dtype=_FROM_V2[datatype])
    else:
        raise ValueError(f"output {tensor.get('name')!r}: unknown V2 datatype {datatype!r}")
    return array.reshape(shape) if shape or array.size == 1 else array
