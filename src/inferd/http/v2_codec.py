"""Tensors of the Open Inference Protocol (V2): JSON and the binary tensor data extension.

A V2 request is a JSON object ``{"id", "parameters", "inputs": [...], "outputs": [...]}``. Each
input names a ``datatype`` and a ``shape`` and carries its elements either as JSON ``data``
(flat or nested, row-major) or, with the binary extension, as raw little-endian bytes after the
JSON: the ``Inference-Header-Content-Length`` header then says where the JSON ends, and each
binary input says its size in ``parameters.binary_data_size``. ``BYTES`` elements are sent as a
4-byte little-endian length followed by the bytes. Answers use the same two forms, per output.

This module only reads and writes tensors (and the fixed outputs of inferd's tabular models);
it knows nothing of HTTP. Every refusal is a :class:`~inferd.errors.BadRequest` that names the
tensor and says what was wrong.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from inferd.codec import json_kind
from inferd.errors import BadRequest

__all__ = [
    "DATATYPES",
    "InferRequest",
    "RequestedOutput",
    "Tensor",
    "deserialize_bytes",
    "encode_response",
    "parse_request",
    "serialize_bytes",
]

DATATYPES: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype("?"),
    "UINT8": np.dtype("<u1"),
    "UINT16": np.dtype("<u2"),
    "UINT32": np.dtype("<u4"),
    "UINT64": np.dtype("<u8"),
    "INT8": np.dtype("<i1"),
    "INT16": np.dtype("<i2"),
    "INT32": np.dtype("<i4"),
    "INT64": np.dtype("<i8"),
    "FP16": np.dtype("<f2"),
    "FP32": np.dtype("<f4"),
    "FP64": np.dtype("<f8"),
    "BYTES": np.dtype(object),
}
"""Datatype names of the protocol and their wire dtypes (little-endian). ``BF16`` has no numpy
dtype and is refused."""

_LENGTH = struct.Struct("<I")
_MAX_DIMS = 8
_MAX_ID = 128


@dataclass(slots=True)  # not frozen: built for every request, and frozen costs a call a field
class Tensor:
    """One named tensor; ``data`` has ``shape`` (an object array of ``bytes`` for BYTES)."""

    name: str
    datatype: str
    shape: tuple[int, ...]
    data: npt.NDArray[Any]
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class RequestedOutput:
    """An entry of the request's ``outputs``: which output, in which form."""

    name: str
    binary: bool | None
    """``parameters.binary_data``; None when the request did not say."""
    classification: int = 0
    """``parameters.classification``: answer the top-k classes as ``BYTES`` instead."""


@dataclass(slots=True)
class InferRequest:
    """A parsed and validated inference request."""

    id: str | None
    inputs: list[Tensor]
    outputs: list[RequestedOutput] | None
    """None when the request names no outputs: every output is returned."""
    parameters: dict[str, Any]

    @property
    def binary_output(self) -> bool:
        """``parameters.binary_data_output``: the default form of the outputs."""
        return self.parameters.get("binary_data_output") is True


# ---------------------------------------------------------------------------------- requests
def parse_request(body: bytes, header_length: int | None = None) -> InferRequest:
    """Read an inference request; ``header_length`` is ``Inference-Header-Content-Length``."""
    if header_length is None:
        header, tail = body, b""
    else:
        if not 0 < header_length <= len(body):
            raise BadRequest(
                f"Inference-Header-Content-Length is {header_length} but the body has "
                f"{len(body)} bytes; it must give the length of the JSON part"
            )
        header, tail = body[:header_length], body[header_length:]
    try:
        doc = orjson.loads(header)
    except orjson.JSONDecodeError as exc:
        hint = (
            "; binary tensor data needs the Inference-Header-Content-Length header"
            if header_length is None
            else ""
        )
        raise BadRequest(f"request body is not valid JSON: {exc}{hint}") from None
    if not tail and type(doc) is dict:
        common = _common(doc)
        if common is not None:
            return common
    if not isinstance(doc, dict):
        raise BadRequest(f"request body must be a JSON object, got {json_kind(doc)}")
    for key in doc:
        if key not in ("id", "parameters", "inputs", "outputs"):
            raise BadRequest(f"unknown field {key!r}; expected id, parameters, inputs, outputs")
    request_id = doc.get("id")
    if request_id is not None and (not isinstance(request_id, str) or len(request_id) > _MAX_ID):
        raise BadRequest(f"id must be a string of at most {_MAX_ID} characters")
    parameters = _parameters(doc.get("parameters"), "parameters")
    raw_inputs = doc.get("inputs")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise BadRequest("inputs must be a non-empty list of tensors")
    inputs: list[Tensor] = []
    offset = 0
    for i, raw in enumerate(raw_inputs):
        tensor, used = _input(raw, i, tail, offset)
        offset += used
        if any(t.name == tensor.name for t in inputs):
            raise BadRequest(f"input {tensor.name!r} is given twice")
        inputs.append(tensor)
    if offset != len(tail):
        raise BadRequest(
            f"{len(tail) - offset} bytes of binary data after the JSON are not claimed by any "
            "input's binary_data_size"
        )
    return InferRequest(request_id, inputs, _outputs(doc.get("outputs")), parameters)


_DOC_KEYS = frozenset(("id", "parameters", "inputs", "outputs"))
_JSON_INPUT_KEYS = frozenset(("name", "shape", "datatype", "data"))
_NUMBERS = frozenset((int, float))
_REAL = frozenset(("FP64", "FP32", "FP16"))


def _common(doc: dict[str, Any]) -> InferRequest | None:
    """The request most clients send, read in one pass: one input of real numbers as flat
    JSON ``data``, no outputs named, no binary data. None for anything else (or anything
    wrong), which the full reader then reads, or refuses saying why."""
    if not doc.keys() <= _DOC_KEYS or "outputs" in doc:
        return None
    request_id = doc.get("id")
    if request_id is not None and (type(request_id) is not str or len(request_id) > _MAX_ID):
        return None
    parameters = doc.get("parameters")
    if parameters is None:
        parameters = {}
    elif type(parameters) is not dict:
        return None
    inputs = doc.get("inputs")
    if type(inputs) is not list or len(inputs) != 1:
        return None
    raw = inputs[0]
    if type(raw) is not dict or raw.keys() != _JSON_INPUT_KEYS:
        return None
    name, datatype, shape, data = raw["name"], raw["datatype"], raw["shape"], raw["data"]
    if type(name) is not str or not name or datatype not in _REAL:
        return None
    if type(shape) is not list or not 0 < len(shape) <= _MAX_DIMS:
        return None
    count = 1
    for dim in shape:
        if type(dim) is not int or dim < 0:
            return None
        count *= dim
    if type(data) is not list or len(data) != count or not set(map(type, data)) <= _NUMBERS:
        return None
    try:
        array = np.array(data, dtype=DATATYPES[datatype]).reshape(shape)
    except OverflowError:
        return None
    dims = tuple(shape)
    return InferRequest(request_id, [Tensor(name, datatype, dims, array, {})], None, parameters)


def _input(raw: Any, index: int, tail: bytes, offset: int) -> tuple[Tensor, int]:
    """One entry of ``inputs``; returns the tensor and the binary bytes it used."""
    where = f"inputs[{index}]"
    if not isinstance(raw, dict):
        raise BadRequest(f"{where} must be an object, got {json_kind(raw)}")
    name = raw.get("name")
    if not isinstance(name, str) or not name:
        raise BadRequest(f"{where}.name must be a non-empty string")
    where = f"input {name!r}"
    for key in raw:
        if key not in ("name", "shape", "datatype", "parameters", "data"):
            raise BadRequest(
                f"{where}: unknown field {key!r}; expected name, shape, datatype, parameters, data"
            )
    datatype = raw.get("datatype")
    if not isinstance(datatype, str) or datatype not in DATATYPES:
        raise BadRequest(
            f"{where}: datatype must be one of {', '.join(DATATYPES)}, got {datatype!r}"
        )
    shape = _shape(raw.get("shape"), where)
    parameters = _parameters(raw.get("parameters"), f"{where}.parameters")
    size = parameters.get("binary_data_size")
    count = math.prod(shape)
    if size is None:
        if "data" not in raw:
            raise BadRequest(f"{where} has no data (and no parameters.binary_data_size)")
        data = _from_json(raw["data"], datatype, shape, where)
        return Tensor(name, datatype, shape, data, parameters), 0
    if "data" in raw:
        raise BadRequest(f"{where}: give either data or parameters.binary_data_size, not both")
    if type(size) is not int or size < 0:
        raise BadRequest(f"{where}: parameters.binary_data_size must be a non-negative integer")
    if offset + size > len(tail):
        raise BadRequest(
            f"{where}: binary_data_size is {size} bytes but only {len(tail) - offset} bytes of "
            "binary data are left after the JSON (is Inference-Header-Content-Length right?)"
        )
    chunk = tail[offset : offset + size]
    if datatype == "BYTES":
        values = deserialize_bytes(chunk, where)
        if len(values) != count:
            raise BadRequest(
                f"{where}: binary data holds {len(values)} BYTES elements; shape "
                f"{list(shape)} needs {count}"
            )
        data = _object_array(values, shape)
    else:
        dtype = DATATYPES[datatype]
        if size != count * dtype.itemsize:
            raise BadRequest(
                f"{where}: binary data is {size} bytes; shape {list(shape)} of {datatype} "
                f"needs {count * dtype.itemsize}"
            )
        data = np.frombuffer(chunk, dtype=dtype).reshape(shape)
    return Tensor(name, datatype, shape, data, parameters), size


def _shape(raw: Any, where: str) -> tuple[int, ...]:
    if not isinstance(raw, list) or len(raw) > _MAX_DIMS:
        raise BadRequest(f"{where}: shape must be a list of at most {_MAX_DIMS} sizes")
    for dim in raw:
        if type(dim) is not int or dim < 0:
            raise BadRequest(f"{where}: shape {raw} must hold non-negative integers")
    return tuple(raw)


def _parameters(raw: Any, where: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadRequest(f"{where} must be an object, got {json_kind(raw)}")
    return raw


def _outputs(raw: Any) -> list[RequestedOutput] | None:
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise BadRequest(f"outputs must be a list, got {json_kind(raw)}")
    outputs: list[RequestedOutput] = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise BadRequest(f"outputs[{i}] must be an object with a name")
        name = item["name"]
        parameters = _parameters(item.get("parameters"), f"output {name!r} parameters")
        binary = parameters.get("binary_data")
        if binary is not None and not isinstance(binary, bool):
            raise BadRequest(f"output {name!r}: parameters.binary_data must be true or false")
        top = parameters.get("classification", 0)
        if type(top) is not int or top < 0:
            raise BadRequest(
                f"output {name!r}: parameters.classification must be a non-negative integer"
            )
        if any(o.name == name for o in outputs):
            raise BadRequest(f"output {name!r} is requested twice")
        outputs.append(RequestedOutput(name, binary, top))
    return outputs


def _from_json(data: Any, datatype: str, shape: tuple[int, ...], where: str) -> npt.NDArray[Any]:
    """JSON ``data`` (flat, or nested exactly as ``shape``) as an array of ``shape``."""
    count = math.prod(shape)
    if not isinstance(data, list):
        data = [data]  # a scalar for a one-element tensor
    if data and isinstance(data[0], list):
        flat: list[Any] = []
        _flatten_nested(data, shape, 0, flat, where)
    else:
        flat = data
    if len(flat) != count:
        raise BadRequest(
            f"{where}: data has {len(flat)} elements; shape {list(shape)} needs {count}"
        )
    if datatype == "BYTES":
        values = []
        for i, value in enumerate(flat):
            if not isinstance(value, str):
                raise BadRequest(
                    f"{where}: BYTES element {i} must be a string, got {json_kind(value)}"
                )
            values.append(value.encode())
        return _object_array(values, shape)
    if datatype == "BOOL":
        allowed: tuple[type, ...] = (bool,)
        wanted = "true or false"
    elif datatype.startswith(("INT", "UINT")):
        allowed = (int,)
        wanted = "an integer"
    else:
        allowed = (int, float)
        wanted = "a number"
    if not set(map(type, flat)).issubset(allowed):  # (in C; the loop below says which)
        for i, value in enumerate(flat):
            if type(value) not in allowed:
                raise BadRequest(
                    f"{where}: {datatype} element {i} must be {wanted}, got {json_kind(value)}"
                )
    try:
        array = np.array(flat, dtype=DATATYPES[datatype])
    except OverflowError:
        raise BadRequest(f"{where}: a value is out of the range of {datatype}") from None
    return array.reshape(shape)


def _flatten_nested(
    data: list[Any], shape: tuple[int, ...], depth: int, out: list[Any], where: str
) -> None:
    if depth >= len(shape) or len(data) != shape[depth]:
        raise BadRequest(
            f"{where}: nested data does not match shape {list(shape)}; send it flat or nested "
            "exactly as the shape says"
        )
    if depth == len(shape) - 1:
        for value in data:
            if isinstance(value, list):
                raise BadRequest(f"{where}: nested data is deeper than shape {list(shape)}")
        out.extend(data)
        return
    for item in data:
        if not isinstance(item, list):
            raise BadRequest(f"{where}: nested data does not match shape {list(shape)}")
        _flatten_nested(item, shape, depth + 1, out, where)


def _object_array(values: list[bytes], shape: tuple[int, ...]) -> npt.NDArray[Any]:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array.reshape(shape)


# ---------------------------------------------------------------------------------- BYTES
def serialize_bytes(values: npt.NDArray[Any]) -> bytes:
    """BYTES elements as the binary extension sends them: a 4-byte LE length, then the bytes."""
    parts: list[bytes] = []
    for value in values.reshape(-1).tolist():
        raw = value if isinstance(value, bytes) else str(value).encode()
        parts.append(_LENGTH.pack(len(raw)))
        parts.append(raw)
    return b"".join(parts)


def deserialize_bytes(buffer: bytes, where: str = "tensor") -> list[bytes]:
    """The elements of a binary BYTES tensor; refuses a length running past the end."""
    values: list[bytes] = []
    offset, end = 0, len(buffer)
    while offset < end:
        if offset + 4 > end:
            raise BadRequest(f"{where}: binary BYTES data ends inside a 4-byte length prefix")
        (length,) = _LENGTH.unpack_from(buffer, offset)
        offset += 4
        if offset + length > end:
            raise BadRequest(
                f"{where}: a BYTES element says {length} bytes but only {end - offset} are left"
            )
        values.append(buffer[offset : offset + length])
        offset += length
    return values


# ---------------------------------------------------------------------------------- responses
def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: list[tuple[Tensor, bool]],
) -> tuple[bytes, int | None]:
    """The response body and, when any output is binary, the length of its JSON part.

    ``outputs`` pairs each tensor with whether to send it binary.
    """
    entries: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for tensor, binary in outputs:
        entry: dict[str, Any] = {
            "name": tensor.name,
            "datatype": tensor.datatype,
            "shape": list(tensor.shape),
        }
        if binary:
            raw = _to_binary(tensor)
            entry["parameters"] = {**tensor.parameters, "binary_data_size": len(raw)}
            blobs.append(raw)
        else:
            if tensor.parameters:
                entry["parameters"] = tensor.parameters
            entry["data"] = _to_json(tensor)
        entries.append(entry)
    doc: dict[str, Any] = {"model_name": model_name, "model_version": model_version}
    if request_id is not None:
        doc["id"] = request_id
    doc["outputs"] = entries
    header = orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)
    if not blobs:
        return header, None
    return b"".join([header, *blobs]), len(header)


def _to_binary(tensor: Tensor) -> bytes:
    if tensor.datatype == "BYTES":
        return serialize_bytes(tensor.data)
    return np.ascontiguousarray(tensor.data, dtype=DATATYPES[tensor.datatype]).tobytes()


def _to_json(tensor: Tensor) -> Any:
    """The elements, flat: a list of strings for BYTES, else a 1-D array (orjson writes
    numpy arrays itself, faster than it writes a list of Python numbers)."""
    flat = tensor.data.reshape(-1)
    if tensor.datatype == "BYTES":
        return [
            v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v) for v in flat.tolist()
        ]
    values = np.ascontiguousarray(flat, dtype=DATATYPES[tensor.datatype].newbyteorder("="))
    if values.dtype == np.float16:  # orjson writes no float16 arrays
        return values.tolist()
    return values
