"""inferd's models as V2 tensors: the one input a model takes, the outputs it answers.

A tabular model takes ``input``, rows of its features (``[-1, n_features]``, sent in any
numeric datatype and converted to FP64); an image model takes ``input``, pictures already
prepared as its ``[image]`` table says (``[-1, channels, size, size]``, converted to FP32). A
classifier answers ``probabilities`` (FP64 ``[n, n_classes]``) and ``label`` (BYTES ``[n]``),
the same numbers and labels as ``/v1``; a regressor answers ``predictions`` (FP64 ``[n]``).
The classification extension turns ``probabilities`` into the top classes, as Triton does.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt
import orjson

from inferd.errors import BadRequest, PayloadTooLarge
from inferd.http.v2_codec import DATATYPES, InferRequest, RequestedOutput, Tensor
from inferd.models.base import FloatArray
from inferd.models.registry import LoadedModel

__all__ = [
    "INPUT_NAME",
    "input_signature",
    "json_answer",
    "model_input",
    "model_metadata",
    "model_outputs",
    "output_metadata",
    "render_output",
    "selected_outputs",
]

INPUT_NAME = "input"
"""The one input tensor of a model."""

# Input datatypes a model takes: every numeric one (converted to the model's own).
_NUMERIC = (
    "FP64", "FP32", "FP16",
    "INT8", "INT16", "INT32", "INT64",
    "UINT8", "UINT16", "UINT32", "UINT64",
)  # fmt: skip


def model_metadata(loaded: LoadedModel, versions: list[str]) -> dict[str, Any]:
    """``GET /v2/models/{name}``: ``versions`` are the ones served; text-generation models
    have no tensors here."""
    spec = loaded.spec
    doc: dict[str, Any] = {
        "name": loaded.name,
        "versions": versions,
        "platform": spec.runtime,
        "inputs": [],
        "outputs": [],
        "parameters": {"task": spec.task, "input_type": spec.input.type},
    }
    if spec.generates_text:
        return doc
    datatype, shape = input_signature(loaded)
    doc["inputs"] = [{"name": INPUT_NAME, "datatype": datatype, "shape": shape}]
    doc["outputs"] = output_metadata(loaded)
    if spec.takes_images:
        image = spec.image
        doc["parameters"]["image"] = {
            "channels": image.channels,
            "size": image.size,
            "resize": image.shorter_side,
            "mean": list(image.mean_values),
            "std": list(image.std_values),
        }
    else:
        doc["parameters"]["features"] = list(spec.input.features)
    if loaded.labels is not None:
        doc["parameters"]["labels"] = list(loaded.labels)
    return doc


@dataclass(slots=True)
class _Layout:
    """What every request to one loaded version needs, worked out once per version."""

    datatype: str
    shape: list[int]
    dtype: np.dtype[Any]
    outputs: list[RequestedOutput]
    """Every output, in order: what a request that names none gets."""
    names: frozenset[str]
    labels: npt.NDArray[Any] | None
    """A classifier's class names (``bytes``) by column; None for values."""
    label_text: list[str]
    """The same names as text."""


_LAYOUTS: weakref.WeakKeyDictionary[LoadedModel, _Layout] = weakref.WeakKeyDictionary()


_last: tuple[weakref.ref[LoadedModel], _Layout] | None = None
"""The version whose layout was looked up last, and that layout: a request looks its model's
up three times (input, outputs, answer), and :data:`_LAYOUTS` makes a weak reference for each
look."""


def _layout(loaded: LoadedModel) -> _Layout:
    global _last
    last = _last
    if last is not None and last[0]() is loaded:
        return last[1]
    layout = _LAYOUTS.get(loaded)
    if layout is not None:
        _last = (weakref.ref(loaded), layout)
        return layout
    datatype, shape = input_signature(loaded)
    names = [o["name"] for o in output_metadata(loaded)]
    labels, text = None, []
    if _is_classifier(loaded):
        text = _labels(loaded)
        labels = np.array([s.encode() for s in text], dtype=object)
    layout = _Layout(
        datatype,
        shape,
        DATATYPES[datatype],
        [RequestedOutput(name, None) for name in names],
        frozenset(names),
        labels,
        text,
    )
    if loaded.ready:  # a version's classes are only known once it has loaded
        _LAYOUTS[loaded] = layout
        _last = (weakref.ref(loaded), layout)
    return layout


def model_input(parsed: InferRequest, loaded: LoadedModel, max_instances: int) -> FloatArray:
    """The request's one input as the array the model takes: float64 rows of features,
    or float32 prepared pictures."""
    layout = _layout(loaded)
    shape = layout.shape
    inputs = parsed.inputs
    if len(inputs) != 1 or inputs[0].name != INPUT_NAME:
        given = ", ".join(repr(t.name) for t in inputs)
        raise BadRequest(
            f"model {loaded.name!r} takes one input, {INPUT_NAME!r} with shape "
            f"{_expected(loaded, shape)}; got {given}"
        )
    tensor = inputs[0]
    if tensor.datatype not in _NUMERIC:
        raise BadRequest(
            f"input {INPUT_NAME!r} must be numeric (FP64, FP32, FP16, INT*, UINT*); "
            f"got {tensor.datatype}"
        )
    given_shape = tensor.shape
    if len(given_shape) != len(shape) or list(given_shape[1:]) != shape[1:]:
        raise BadRequest(
            f"input {INPUT_NAME!r} has shape {list(given_shape)}; model {loaded.name!r} "
            f"takes {_expected(loaded, shape)}"
        )
    n = given_shape[0]
    if n == 0:
        raise BadRequest(f"input {INPUT_NAME!r} has no rows")
    if n > max_instances:
        raise PayloadTooLarge(f"{n} rows in one request; the limit is {max_instances}")
    array: FloatArray = tensor.data.astype(layout.dtype)
    # A finite sum means finite elements (NaN and infinities carry through a sum); only an
    # overflowing sum needs the element-wise look.
    if not math.isfinite(array.sum()) and not np.isfinite(array).all():
        raise BadRequest(f"input {INPUT_NAME!r} must hold finite numbers (no NaN or Infinity)")
    return array


def _expected(loaded: LoadedModel, shape: list[int]) -> str:
    return f"{shape} ({_what_rows_are(loaded)})"


def input_signature(loaded: LoadedModel) -> tuple[str, list[int]]:
    """The datatype and shape of the model's input, as its metadata states them."""
    spec = loaded.spec
    if spec.takes_images:
        return "FP32", [-1, *spec.image.input_shape]
    return "FP64", [-1, spec.n_features]


def _what_rows_are(loaded: LoadedModel) -> str:
    spec = loaded.spec
    if spec.takes_images:
        image = spec.image
        return (
            f"{image.channels} pictures of {image.size}x{image.size}, scaled to [0, 1] and "
            f"normalized with mean {list(image.mean_values)} and std {list(image.std_values)}; "
            f"or upload the picture itself to POST /v1/models/{loaded.name}/classify"
        )
    return f"rows of {', '.join(spec.input.features)}"


def _is_classifier(loaded: LoadedModel) -> bool:
    """A loaded classifier that names no classes answers values, as on ``/v1``; before it
    has loaded, its task is all there is to go by."""
    if loaded.spec.task != "classification":
        return False
    return loaded.classes is not None or not loaded.ready


def output_metadata(loaded: LoadedModel) -> list[dict[str, Any]]:
    if _is_classifier(loaded):
        n_classes = len(loaded.classes) if loaded.classes is not None else -1  # -1: not loaded
        return [
            {"name": "probabilities", "datatype": "FP64", "shape": [-1, n_classes]},
            {"name": "label", "datatype": "BYTES", "shape": [-1]},
        ]
    return [{"name": "predictions", "datatype": "FP64", "shape": [-1]}]


def _labels(loaded: LoadedModel) -> list[str]:
    classes = loaded.classes or []
    return loaded.labels if loaded.labels else [str(c) for c in classes]


def model_outputs(loaded: LoadedModel, output: FloatArray) -> dict[str, Tensor]:
    """The model's answer as named tensors (the same numbers ``/v1`` answers with)."""
    names = _layout(loaded).labels
    if names is None:
        values = np.asarray(output, dtype=np.float64).reshape(-1)
        return {"predictions": Tensor("predictions", "FP64", values.shape, values)}
    probs = np.asarray(output, dtype=np.float64)
    labels = names[probs.argmax(axis=1)]
    return {
        "probabilities": Tensor("probabilities", "FP64", probs.shape, probs),
        "label": Tensor("label", "BYTES", labels.shape, labels),
    }


def json_answer(loaded: LoadedModel, request_id: str | None, output: FloatArray) -> bytes:
    """The answer to a request that names no outputs and asks for no binary data: every
    output as JSON, written straight from the model's rows (the same bytes
    :func:`~inferd.http.v2_codec.encode_response` writes for them, without the tensors)."""
    doc: dict[str, Any] = {"model_name": loaded.name, "model_version": loaded.version_str}
    if request_id is not None:
        doc["id"] = request_id
    layout = _layout(loaded)
    values = np.ascontiguousarray(output, dtype=np.float64)
    if layout.labels is None:
        flat = values.reshape(-1)
        doc["outputs"] = [
            {"name": "predictions", "datatype": "FP64", "shape": [flat.shape[0]], "data": flat}
        ]
    else:
        text = layout.label_text
        doc["outputs"] = [
            {
                "name": "probabilities",
                "datatype": "FP64",
                "shape": list(values.shape),
                "data": values.reshape(-1),
            },
            {
                "name": "label",
                "datatype": "BYTES",
                "shape": [values.shape[0]],
                "data": [text[i] for i in values.argmax(axis=1).tolist()],
            },
        ]
    return orjson.dumps(doc, option=orjson.OPT_SERIALIZE_NUMPY)


def selected_outputs(parsed: InferRequest, loaded: LoadedModel) -> list[RequestedOutput]:
    """The outputs to send, in order; refuses unknown names before the model runs."""
    layout = _layout(loaded)
    if parsed.outputs is None:
        return layout.outputs
    for wanted in parsed.outputs:
        if wanted.name not in layout.names:
            raise BadRequest(
                f"model {loaded.name!r} has no output {wanted.name!r}; its outputs are "
                f"{', '.join(o.name for o in layout.outputs)}"
            )
        if wanted.classification and wanted.name != "probabilities":
            raise BadRequest(
                f"output {wanted.name!r}: classification applies to 'probabilities' only"
            )
    return parsed.outputs


def render_output(
    tensors: dict[str, Tensor], wanted: RequestedOutput, loaded: LoadedModel, binary: bool
) -> tuple[Tensor, bool]:
    """One output as asked: top classes or not, binary (the request's default) or JSON."""
    tensor = tensors[wanted.name]
    if wanted.classification:
        tensor = _top_classes(tensor, wanted.classification, _labels(loaded))
    return tensor, binary if wanted.binary is None else wanted.binary


def _top_classes(probs: Tensor, k: int, labels: list[str]) -> Tensor:
    """The classification extension: the ``k`` best classes of each row as
    ``"<probability>:<index>:<label>"`` (BYTES ``[n, k]``), best first, as Triton writes them."""
    data = probs.data
    k = min(k, data.shape[1])
    order = np.argsort(-data, axis=1, kind="stable")[:, :k]
    cells = [
        f"{data[i, j]:f}:{j}:{labels[j]}".encode() for i in range(data.shape[0]) for j in order[i]
    ]
    array = np.empty(len(cells), dtype=object)
    array[:] = cells
    return Tensor(probs.name, "BYTES", (data.shape[0], k), array.reshape(data.shape[0], k))
