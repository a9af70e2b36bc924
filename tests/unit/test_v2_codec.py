"""V2 tensors: JSON and binary requests, responses, and every refusal.

Requests are built and responses decoded with ``tritonclient``'s own code as well as by
hand, so the wire format is checked against an independent implementation.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import orjson
import pytest
import tritonclient.http as triton

from inferd.errors import BadRequest
from inferd.http.v2_codec import (
    DATATYPES,
    Tensor,
    deserialize_bytes,
    encode_response,
    parse_request,
    serialize_bytes,
)

NUMERIC: dict[str, list[list[Any]]] = {
    "BOOL": [[True, False, True], [False, False, True]],
    "UINT8": [[0, 1, 255], [7, 8, 9]],
    "UINT16": [[0, 1, 65535], [7, 8, 9]],
    "UINT32": [[0, 1, 2**32 - 1], [7, 8, 9]],
    "UINT64": [[0, 1, 2**64 - 1], [7, 8, 9]],
    "INT8": [[-128, 0, 127], [7, 8, 9]],
    "INT16": [[-32768, 0, 32767], [7, 8, 9]],
    "INT32": [[-(2**31), 0, 2**31 - 1], [7, 8, 9]],
    "INT64": [[-(2**63), 0, 2**63 - 1], [7, 8, 9]],
    "FP16": [[0.5, -1.25, 2.0], [1, 2, 3]],
    "FP32": [[0.1, -1.5, 3.25], [1e30, 2, 3]],
    "FP64": [[0.1, -1.5, 3.25], [1e300, 2, 3]],
}


def body(*inputs: dict[str, Any], **extra: Any) -> bytes:
    return orjson.dumps({"inputs": list(inputs), **extra})


def tensor(data: Any, datatype: str = "FP64", shape: list[int] | None = None) -> dict[str, Any]:
    return {"name": "input", "datatype": datatype, "shape": shape or [2, 3], "data": data}


def refused(raw: bytes, header_length: int | None = None) -> str:
    with pytest.raises(BadRequest) as caught:
        parse_request(raw, header_length)
    assert caught.value.status_code == 400
    return caught.value.message


# ---------------------------------------------------------------------------------- JSON in
@pytest.mark.parametrize("datatype", list(NUMERIC))
def test_json_data_of_every_numeric_datatype(datatype: str) -> None:
    values = NUMERIC[datatype]
    flat = [v for row in values for v in row]
    for data in (values, flat):  # nested and flat are the same tensor
        parsed = parse_request(body(tensor(data, datatype)))
        (got,) = parsed.inputs
        assert got.datatype == datatype
        assert got.shape == (2, 3)
        assert got.data.dtype == DATATYPES[datatype]
        assert got.data.tolist() == np.array(values, dtype=DATATYPES[datatype]).tolist()


def test_json_bytes_are_utf8_strings() -> None:
    parsed = parse_request(body(tensor(["a", "", "zürich 🙂"], "BYTES", [3])))
    assert parsed.inputs[0].data.tolist() == [b"a", b"", "zürich 🙂".encode()]


def test_request_fields_are_kept() -> None:
    raw = body(
        tensor([1, 2, 3, 4, 5, 6]),
        id="req-7",
        parameters={"binary_data_output": True, "timeout": 5000},
        outputs=[
            {"name": "label"},
            {"name": "probabilities", "parameters": {"binary_data": False, "classification": 2}},
        ],
    )
    parsed = parse_request(raw)
    assert parsed.id == "req-7"
    assert parsed.binary_output is True
    assert parsed.parameters["timeout"] == 5000
    assert parsed.outputs is not None
    assert [(o.name, o.binary, o.classification) for o in parsed.outputs] == [
        ("label", None, 0),
        ("probabilities", False, 2),
    ]
    assert parse_request(body(tensor([1, 2, 3, 4, 5, 6]))).outputs is None


@pytest.mark.parametrize(
    ("data", "datatype", "shape", "message"),
    [
        ([1, 2, 3], "FP64", [2, 3], "data has 3 elements; shape [2, 3] needs 6"),
        ([[1, 2, 3], [4, 5]], "FP64", [2, 3], "nested data does not match shape [2, 3]"),
        ([[1, 2], [3, 4], [5, 6]], "FP64", [2, 3], "nested data does not match shape [2, 3]"),
        ([[[1], [2], [3]], [[4], [5], [6]]], "FP64", [2, 3], "deeper than shape"),
        ([1, 2, "3", 4, 5, 6], "FP32", [2, 3], "FP32 element 2 must be a number, got a string"),
        ([1, 2, True, 4, 5, 6], "FP64", [2, 3], "element 2 must be a number, got a boolean"),
        ([1, 2, 3.5, 4, 5, 6], "INT32", [2, 3], "INT32 element 2 must be an integer, got float"),
        ([1, 0, 1, 0, 1, 0], "BOOL", [2, 3], "BOOL element 0 must be true or false, got int"),
        ([1, 2, 300, 4, 5, 6], "INT8", [2, 3], "out of the range of INT8"),
        ([1, 2, -1, 4, 5, 6], "UINT16", [2, 3], "out of the range of UINT16"),
        ([1, 2, 3], "BYTES", [3], "BYTES element 0 must be a string, got int"),
        ([1, 2, 3, 4, 5, 6], "BF16", [2, 3], "datatype must be one of BOOL, UINT8"),
        ([1, 2, 3, 4, 5, 6], "FP64", [2, -3], "must hold non-negative integers"),
        ([1, 2, 3, 4, 5, 6], "FP64", "2x3", "shape must be a list"),
    ],
)
def test_bad_json_tensors_are_refused(data: Any, datatype: str, shape: Any, message: str) -> None:
    raw = orjson.dumps(
        {"inputs": [{"name": "input", "datatype": datatype, "shape": shape, "data": data}]}
    )
    assert message in refused(raw)


@pytest.mark.parametrize(
    ("doc", "message"),
    [
        ([1, 2], "must be a JSON object, got a list"),
        ({"inputs": []}, "inputs must be a non-empty list"),
        ({"inputs": [{"datatype": "FP64", "shape": [1], "data": [1]}]}, "name must be"),
        ({"inputs": [{"name": "x", "datatype": "FP64", "shape": [1]}]}, "input 'x' has no data"),
        ({"inputs": [tensor([1] * 6), tensor([1] * 6)]}, "input 'input' is given twice"),
        ({"inputs": [tensor([1] * 6)], "model": "iris"}, "unknown field 'model'"),
        ({"inputs": [tensor([1] * 6)], "id": 7}, "id must be a string"),
        ({"inputs": [tensor([1] * 6)], "parameters": [1]}, "parameters must be an object"),
        ({"inputs": [tensor([1] * 6)], "outputs": [{"name": "a"}, {"name": "a"}]}, "twice"),
        (
            {
                "inputs": [tensor([1] * 6)],
                "outputs": [{"name": "a", "parameters": {"binary_data": 1}}],
            },
            "binary_data must be true or false",
        ),
    ],
)
def test_bad_requests_are_refused(doc: Any, message: str) -> None:
    assert message in refused(orjson.dumps(doc))


def test_not_json_says_so() -> None:
    assert "not valid JSON" in refused(b"{nope")
    assert "Inference-Header-Content-Length" in refused(b'{"inputs": []}\x00\x01\x02')


# ---------------------------------------------------------------------------------- binary in
def with_binary(header: dict[str, Any], *blobs: bytes) -> tuple[bytes, int]:
    head = orjson.dumps(header)
    return head + b"".join(blobs), len(head)


@pytest.mark.parametrize("datatype", list(NUMERIC))
def test_binary_data_of_every_numeric_datatype(datatype: str) -> None:
    values = np.array(NUMERIC[datatype], dtype=DATATYPES[datatype])
    raw = values.tobytes()
    doc = {
        "inputs": [
            {
                "name": "input",
                "datatype": datatype,
                "shape": [2, 3],
                "parameters": {"binary_data_size": len(raw)},
            }
        ]
    }
    parsed = parse_request(*with_binary(doc, raw))
    np.testing.assert_array_equal(parsed.inputs[0].data, values)


def test_binary_inputs_are_read_in_order_beside_json_ones() -> None:
    a = np.arange(6, dtype="<f4").reshape(2, 3)
    names = serialize_bytes(np.array([b"x", b"yz"], dtype=object))
    doc = {
        "inputs": [
            {
                "name": "a",
                "datatype": "FP32",
                "shape": [2, 3],
                "parameters": {"binary_data_size": 24},
            },
            {"name": "j", "datatype": "INT64", "shape": [2], "data": [5, 6]},
            {
                "name": "s",
                "datatype": "BYTES",
                "shape": [2],
                "parameters": {"binary_data_size": len(names)},
            },
        ]
    }
    parsed = parse_request(*with_binary(doc, a.tobytes(), names))
    got = {t.name: t.data.tolist() for t in parsed.inputs}
    assert got == {"a": a.tolist(), "j": [5, 6], "s": [b"x", b"yz"]}


def binary_doc(datatype: str, shape: list[int], size: int) -> dict[str, Any]:
    return {
        "inputs": [
            {
                "name": "input",
                "datatype": datatype,
                "shape": shape,
                "parameters": {"binary_data_size": size},
            }
        ]
    }


def test_binary_of_the_wrong_length_is_refused() -> None:
    data = np.zeros((2, 3), dtype="<f4").tobytes()[:-4]
    message = refused(*with_binary(binary_doc("FP32", [2, 3], len(data)), data))
    assert "binary data is 20 bytes; shape [2, 3] of FP32 needs 24" in message


def test_binary_size_past_the_body_is_refused() -> None:
    message = refused(*with_binary(binary_doc("FP64", [1, 4], 32), b"\x00" * 16))
    assert "only 16 bytes of binary data are left" in message


def test_unclaimed_binary_bytes_are_refused() -> None:
    message = refused(*with_binary(binary_doc("FP64", [1, 1], 8), b"\x00" * 12))
    assert "4 bytes of binary data after the JSON are not claimed" in message


def test_header_length_must_fit_the_body() -> None:
    raw = body(tensor([1] * 6))
    assert "Inference-Header-Content-Length is 999" in refused(raw, 999)
    assert "Inference-Header-Content-Length is 0" in refused(raw, 0)


def test_data_and_binary_size_together_are_refused() -> None:
    doc = binary_doc("FP64", [1], 8)
    doc["inputs"][0]["data"] = [1.0]
    assert "either data or parameters.binary_data_size" in refused(*with_binary(doc, b"\0" * 8))


def test_binary_bytes_elements_must_match_shape() -> None:
    blob = serialize_bytes(np.array([b"a", b"b"], dtype=object))
    message = refused(*with_binary(binary_doc("BYTES", [3], len(blob)), blob))
    assert "holds 2 BYTES elements; shape [3] needs 3" in message


def test_bytes_serialization_round_trips() -> None:
    values = np.array([b"", b"abc", "zürich".encode(), b"\x00\xff"], dtype=object)
    blob = serialize_bytes(values)
    assert blob[:4] == struct.pack("<I", 0)
    assert deserialize_bytes(blob) == values.tolist()


def test_truncated_bytes_are_refused() -> None:
    blob = serialize_bytes(np.array([b"hello"], dtype=object))
    with pytest.raises(BadRequest, match="says 5 bytes but only 4 are left"):
        deserialize_bytes(blob[:-1])
    with pytest.raises(BadRequest, match="inside a 4-byte length prefix"):
        deserialize_bytes(blob + b"\x01\x00")


def test_tritonclient_request_bodies_are_understood() -> None:
    """What ``InferInput.set_data_from_numpy`` sends, binary (its default) and JSON."""
    rows = np.array([[5.1, 3.5, 1.4, 0.2], [6.7, 3.0, 5.2, 2.3]], dtype=np.float32)
    names = np.array([b"a", "ß".encode()], dtype=object)
    for binary in (True, False):
        first = triton.InferInput("input", list(rows.shape), "FP32")
        first.set_data_from_numpy(rows, binary_data=binary)
        second = triton.InferInput("names", [2], "BYTES")
        second.set_data_from_numpy(names, binary_data=binary)
        outputs = [triton.InferRequestedOutput("label", binary_data=binary)]
        raw, length = triton.InferenceServerClient.generate_request_body(
            [first, second], outputs=outputs, request_id="r1"
        )
        parsed = parse_request(raw, length)
        assert parsed.id == "r1"
        np.testing.assert_array_equal(parsed.inputs[0].data, rows)
        assert parsed.inputs[1].data.tolist() == names.tolist()
        assert parsed.outputs is not None
        assert parsed.outputs[0].binary is binary


# ---------------------------------------------------------------------------------- responses
def outputs() -> list[Tensor]:
    probs = np.array([[0.9, 0.1], [0.25, 0.75]])
    labels = np.array([b"cat", "hé".encode()], dtype=object)
    ints = np.array([1, -2, 3], dtype="<i4")
    return [
        Tensor("probabilities", "FP64", probs.shape, probs),
        Tensor("label", "BYTES", labels.shape, labels),
        Tensor("n", "INT32", ints.shape, ints),
    ]


def test_json_response() -> None:
    raw, length = encode_response("iris", "1", "abc", [(t, False) for t in outputs()])
    assert length is None
    doc = orjson.loads(raw)
    assert doc == {
        "model_name": "iris",
        "model_version": "1",
        "id": "abc",
        "outputs": [
            {
                "name": "probabilities",
                "datatype": "FP64",
                "shape": [2, 2],
                "data": [0.9, 0.1, 0.25, 0.75],
            },
            {"name": "label", "datatype": "BYTES", "shape": [2], "data": ["cat", "hé"]},
            {"name": "n", "datatype": "INT32", "shape": [3], "data": [1, -2, 3]},
        ],
    }
    raw, _ = encode_response("iris", "1", None, [(outputs()[2], False)])
    assert "id" not in orjson.loads(raw)


@pytest.mark.parametrize("binary", [(True, True, True), (True, False, True), (False, True, False)])
def test_binary_responses_decode_with_tritonclient(binary: tuple[bool, ...]) -> None:
    tensors = outputs()
    raw, length = encode_response("iris", "2", "x", list(zip(tensors, binary, strict=True)))
    assert length is not None
    header = orjson.loads(raw[:length])
    sizes = [o.get("parameters", {}).get("binary_data_size") for o in header["outputs"]]
    assert [s is not None for s in sizes] == list(binary)
    assert length + sum(s for s in sizes if s) == len(raw)
    result = triton.InferenceServerClient.parse_response_body(raw, header_length=length)
    np.testing.assert_array_equal(result.as_numpy("probabilities").reshape(2, 2), tensors[0].data)
    # tritonclient gives JSON BYTES as str and binary ones as bytes.
    labels = [v if isinstance(v, str) else v.decode() for v in result.as_numpy("label").tolist()]
    assert labels == ["cat", "hé"]
    np.testing.assert_array_equal(result.as_numpy("n"), tensors[2].data)
    assert result.get_response()["model_version"] == "2"
