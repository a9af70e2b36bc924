"""Tensors of the Open Inference Protocol as gRPC carries them.

A ``ModelInferRequest`` gives each input's elements either in ``raw_input_contents`` (one
entry per input, in order: little-endian bytes, or for ``BYTES`` a 4-byte little-endian length
before each element) or in the input's typed ``contents`` (``fp64_contents``...). Both become
the :class:`~inferd.http.v2_codec.InferRequest` the REST protocol reads, so the two protocols
decode, validate and answer alike. Answers go back in the form the request used.

Every refusal is a :class:`~inferd.errors.BadRequest` that names the tensor.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import numpy.typing as npt

from inferd.errors import BadRequest
from inferd.grpc import grpc_predict_v2_pb2 as pb
from inferd.http.v2_codec import (
    DATATYPES,
    InferRequest,
    RequestedOutput,
    Tensor,
    deserialize_bytes,
    serialize_bytes,
)

__all__ = ["encode_response", "parameters", "parse_request"]

CONTENTS = {
    "BOOL": "bool_contents",
    "INT8": "int_contents",
    "INT16": "int_contents",
    "INT32": "int_contents",
    "INT64": "int64_contents",
    "UINT8": "uint_contents",
    "UINT16": "uint_contents",
    "UINT32": "uint_contents",
    "UINT64": "uint64_contents",
    "FP32": "fp32_contents",
    "FP64": "fp64_contents",
    "BYTES": "bytes_contents",
}
"""The typed ``contents`` field of each datatype (FP16 has none: it is sent raw)."""

_MAX_DIMS = 8
_MAX_ID = 128


def parameters(fields: Any) -> dict[str, Any]:
    """A protobuf map of ``InferParameter`` (or ``ModelRepositoryParameter``) as plain values."""
    out: dict[str, Any] = {}
    for key, value in fields.items():
        which = value.WhichOneof("parameter_choice")
        out[key] = None if which is None else getattr(value, which)
    return out


def parse_request(request: Any) -> tuple[InferRequest, bool]:
    """The request's tensors, and whether its inputs came as ``raw_input_contents``."""
    raw = request.raw_input_contents
    if raw and len(raw) != len(request.inputs):
        raise BadRequest(
            f"raw_input_contents has {len(raw)} entries for {len(request.inputs)} inputs; give "
            "every input's elements there, in order, or none"
        )
    if not request.inputs:
        raise BadRequest("inputs must name at least one tensor")
    request_id = request.id or None
    if request_id is not None and len(request_id) > _MAX_ID:
        raise BadRequest(f"id must be at most {_MAX_ID} characters")
    inputs: list[Tensor] = []
    for i, given in enumerate(request.inputs):
        tensor = _input(given, raw[i] if raw else None, i)
        if any(t.name == tensor.name for t in inputs):
            raise BadRequest(f"input {tensor.name!r} is given twice")
        inputs.append(tensor)
    outputs: list[RequestedOutput] | None = None
    if request.outputs:
        outputs = []
        for wanted in request.outputs:
            top = parameters(wanted.parameters).get("classification", 0)
            if type(top) is not int or top < 0:
                raise BadRequest(
                    f"output {wanted.name!r}: parameter classification must be a non-negative "
                    "integer"
                )
            if any(o.name == wanted.name for o in outputs):
                raise BadRequest(f"output {wanted.name!r} is requested twice")
            outputs.append(RequestedOutput(wanted.name, None, top))
    return InferRequest(request_id, inputs, outputs, parameters(request.parameters)), bool(raw)


def _input(given: Any, raw: bytes | None, index: int) -> Tensor:
    name = given.name
    if not name:
        raise BadRequest(f"inputs[{index}].name must be a non-empty string")
    where = f"input {name!r}"
    datatype = given.datatype
    if datatype not in DATATYPES:
        raise BadRequest(
            f"{where}: datatype must be one of {', '.join(DATATYPES)}, got {datatype!r}"
        )
    shape = tuple(given.shape)
    if len(shape) > _MAX_DIMS or any(dim < 0 for dim in shape):
        raise BadRequest(
            f"{where}: shape {list(shape)} must be at most {_MAX_DIMS} non-negative sizes"
        )
    count = math.prod(shape)
    params = parameters(given.parameters)
    if raw is not None:
        if given.HasField("contents"):
            raise BadRequest(f"{where}: give raw_input_contents or contents, not both")
        return Tensor(name, datatype, shape, _from_raw(raw, datatype, shape, where), params)
    field = CONTENTS.get(datatype)
    if field is None:
        raise BadRequest(f"{where}: {datatype} has no typed contents; send it raw")
    values = list(getattr(given.contents, field))
    if len(values) != count:
        raise BadRequest(
            f"{where}: contents.{field} has {len(values)} elements; shape {list(shape)} "
            f"needs {count}"
        )
    if datatype == "BYTES":
        data = _object_array(values, shape)
    else:
        try:
            data = np.array(values, dtype=DATATYPES[datatype]).reshape(shape)
        except OverflowError:
            raise BadRequest(f"{where}: a value is out of the range of {datatype}") from None
    return Tensor(name, datatype, shape, data, params)


def _from_raw(raw: bytes, datatype: str, shape: tuple[int, ...], where: str) -> npt.NDArray[Any]:
    count = math.prod(shape)
    if datatype == "BYTES":
        values = deserialize_bytes(raw, where)
        if len(values) != count:
            raise BadRequest(
                f"{where}: raw contents hold {len(values)} BYTES elements; shape "
                f"{list(shape)} needs {count}"
            )
        return _object_array(values, shape)
    dtype = DATATYPES[datatype]
    if len(raw) != count * dtype.itemsize:
        raise BadRequest(
            f"{where}: raw contents are {len(raw)} bytes; shape {list(shape)} of {datatype} "
            f"needs {count * dtype.itemsize}"
        )
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def _object_array(values: list[bytes], shape: tuple[int, ...]) -> npt.NDArray[Any]:
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array.reshape(shape)


def encode_response(
    model_name: str,
    model_version: str,
    request_id: str | None,
    outputs: list[tuple[Tensor, bool]],
    raw: bool,
) -> Any:
    """A ``ModelInferResponse``: the outputs in ``raw_output_contents`` when ``raw`` (the
    request sent its inputs so), else in each output's typed ``contents``."""
    response = pb.ModelInferResponse(
        model_name=model_name, model_version=model_version, id=request_id or ""
    )
    for tensor, _binary in outputs:
        out = response.outputs.add(name=tensor.name, datatype=tensor.datatype)
        out.shape.extend(tensor.shape)
        data = tensor.data
        if raw:
            if tensor.datatype == "BYTES":
                response.raw_output_contents.append(serialize_bytes(data))
            else:
                wire = np.ascontiguousarray(data, dtype=DATATYPES[tensor.datatype])
                response.raw_output_contents.append(wire.tobytes())
            continue
        field = CONTENTS[tensor.datatype]
        flat = data.reshape(-1).tolist()
        if tensor.datatype == "BYTES":
            flat = [v if isinstance(v, bytes) else str(v).encode() for v in flat]
        getattr(out.contents, field).extend(flat)
    return response
