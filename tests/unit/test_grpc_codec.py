"""The gRPC side of the Open Inference Protocol: messages to tensors and back."""

from __future__ import annotations

import struct
import subprocess
import sys

import numpy as np
import pytest

from inferd.errors import BadRequest
from inferd.grpc import codec
from inferd.grpc import grpc_predict_v2_pb2 as pb
from inferd.http.v2_codec import DATATYPES, Tensor, serialize_bytes

TYPED = {
    "BOOL": [True, False],
    "INT8": [-3, 7],
    "INT16": [-300, 7],
    "INT32": [-70000, 7],
    "INT64": [-(2**40), 7],
    "UINT8": [250, 7],
    "UINT16": [65000, 7],
    "UINT32": [4_000_000_000, 7],
    "UINT64": [2**63, 7],
    "FP32": [1.5, -2.25],
    "FP64": [1.5, -2.25],
    "BYTES": [b"ab", b""],
}


def request(**fields: object) -> pb.ModelInferRequest:
    return pb.ModelInferRequest(model_name="m", **fields)


@pytest.mark.parametrize("datatype", sorted(TYPED))
def test_typed_contents_of_every_datatype(datatype: str) -> None:
    message = request()
    given = message.inputs.add(name="x", datatype=datatype, shape=[1, 2])
    getattr(given.contents, codec.CONTENTS[datatype]).extend(TYPED[datatype])
    parsed, raw = codec.parse_request(message)
    assert not raw
    tensor = parsed.inputs[0]
    assert (tensor.name, tensor.datatype, tensor.shape) == ("x", datatype, (1, 2))
    assert tensor.data.reshape(-1).tolist() == TYPED[datatype]
    if datatype != "BYTES":
        assert tensor.data.dtype == DATATYPES[datatype]


@pytest.mark.parametrize("datatype", ["FP16", "FP64", "INT32", "BOOL"])
def test_raw_contents(datatype: str) -> None:
    values = np.array([[1, 0], [0, 1]]).astype(DATATYPES[datatype])
    message = request(raw_input_contents=[values.tobytes()])
    message.inputs.add(name="x", datatype=datatype, shape=[2, 2])
    parsed, raw = codec.parse_request(message)
    assert raw
    assert parsed.inputs[0].data.tolist() == values.tolist()


def test_raw_bytes_and_request_fields() -> None:
    message = request(id="r-1", raw_input_contents=[serialize_bytes(np.array([b"a", b"bc"]))])
    message.inputs.add(name="s", datatype="BYTES", shape=[2])
    message.parameters["timeout"].int64_param = 5000
    wanted = message.outputs.add(name="probabilities")
    wanted.parameters["classification"].int64_param = 2
    parsed, _ = codec.parse_request(message)
    assert parsed.id == "r-1"
    assert parsed.inputs[0].data.tolist() == [b"a", b"bc"]
    assert parsed.parameters == {"timeout": 5000}
    assert [(o.name, o.classification) for o in parsed.outputs or []] == [("probabilities", 2)]


def refusal(message: pb.ModelInferRequest) -> str:
    with pytest.raises(BadRequest) as caught:
        codec.parse_request(message)
    return caught.value.message


def test_refusals_say_what_is_wrong() -> None:
    no_inputs = request()
    assert "at least one tensor" in refusal(no_inputs)

    short = request()
    short.inputs.add(name="x", datatype="FP64", shape=[1, 4]).contents.fp64_contents.extend([1.0])
    assert "contents.fp64_contents has 1 elements; shape [1, 4] needs 4" in refusal(short)

    half = request(raw_input_contents=[b"\0" * 8])
    half.inputs.add(name="x", datatype="FP64", shape=[1, 1])
    half.inputs.add(name="y", datatype="FP64", shape=[1, 1])
    assert "raw_input_contents has 1 entries for 2 inputs" in refusal(half)

    wrong_size = request(raw_input_contents=[b"\0" * 7])
    wrong_size.inputs.add(name="x", datatype="FP64", shape=[1, 1])
    assert "raw contents are 7 bytes; shape [1, 1] of FP64 needs 8" in refusal(wrong_size)

    fp16 = request()
    fp16.inputs.add(name="x", datatype="FP16", shape=[1])
    assert "FP16 has no typed contents; send it raw" in refusal(fp16)

    unknown = request()
    unknown.inputs.add(name="x", datatype="COMPLEX", shape=[1])
    assert "datatype must be one of" in refusal(unknown)

    overflow = request()
    overflow.inputs.add(name="x", datatype="INT8", shape=[1]).contents.int_contents.append(300)
    assert "out of the range of INT8" in refusal(overflow)

    twice = request()
    for _ in range(2):
        twice.inputs.add(name="x", datatype="FP64", shape=[1]).contents.fp64_contents.append(1)
    assert "given twice" in refusal(twice)


def test_answers_come_back_in_the_form_asked() -> None:
    probs = np.array([[0.25, 0.75]])
    labels = np.array([b"one"], dtype=object)
    outputs = [
        (Tensor("probabilities", "FP64", probs.shape, probs), False),
        (Tensor("label", "BYTES", labels.shape, labels), False),
    ]
    raw = codec.encode_response("m", "1", "r", outputs, raw=True)
    assert [(o.name, o.datatype, list(o.shape)) for o in raw.outputs] == [
        ("probabilities", "FP64", [1, 2]),
        ("label", "BYTES", [1]),
    ]
    assert struct.unpack("<2d", raw.raw_output_contents[0]) == (0.25, 0.75)
    assert raw.raw_output_contents[1] == struct.pack("<I", 3) + b"one"
    typed = codec.encode_response("m", "1", None, outputs, raw=False)
    assert not typed.raw_output_contents
    assert list(typed.outputs[0].contents.fp64_contents) == [0.25, 0.75]
    assert list(typed.outputs[1].contents.bytes_contents) == [b"one"]
    assert (typed.model_name, typed.model_version, typed.id) == ("m", "1", "")


def test_the_messages_live_beside_tritonclients_in_one_process() -> None:
    """Both define ``inference.*`` messages; the generated module keeps its own pool, so a
    process may import both, and each reads what the other writes."""
    script = (
        "import tritonclient.grpc.service_pb2 as t\n"
        "from inferd.grpc import grpc_predict_v2_pb2 as pb\n"
        "m = pb.ModelInferRequest(model_name='iris', raw_input_contents=[b'x'])\n"
        "m.inputs.add(name='input', datatype='FP64', shape=[1, 4])\n"
        "back = t.ModelInferRequest.FromString(m.SerializeToString())\n"
        "assert back.inputs[0].shape == [1, 4] and back.model_name == 'iris'\n"
        "print(pb.ModelInferRequest.FromString(back.SerializeToString()).inputs[0].name)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "input"
