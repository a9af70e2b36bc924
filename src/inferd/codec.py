"""Hand-written parsing and rendering of prediction bodies (the hot path).

pydantic costs tens of microseconds per request here; these checks cost a few. The rules are the
same a schema would state, and every refusal says what was wrong.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from inferd.errors import BadRequest, PayloadTooLarge, ValidationFailed
from inferd.models.base import FloatArray

__all__ = ["ParsedRequest", "json_kind", "parse_predict", "parse_predict_doc", "render_rows"]

_MAX_REQUEST_ID = 128
_NUMBER = (int, float)


class ParsedRequest:
    """A validated prediction request: the rows and whether it came in batch form."""

    __slots__ = ("batch", "request_id", "rows")

    def __init__(self, rows: FloatArray, batch: bool, request_id: str | None) -> None:
        self.rows = rows
        self.batch = batch
        self.request_id = request_id


def parse_predict(
    body: bytes, n_features: int, feature_names: list[str], max_instances: int, allow_batch: bool
) -> ParsedRequest:
    """Parse ``{"features": [...]}`` (or ``{"instances": [[...], ...]}``) into a float array."""
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        if body[exc.pos : exc.pos + 3] == b"NaN" or body[exc.pos : exc.pos + 8] == b"Infinity":
            raise ValidationFailed(
                "features must be finite numbers; NaN and Infinity are not allowed"
            ) from None
        if "infinity" in str(exc):
            raise ValidationFailed(
                "features must be finite numbers; a value is too large for a 64-bit float"
            ) from None
        raise BadRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise BadRequest(f"request body must be a JSON object, got {json_kind(doc)}")
    return parse_predict_doc(doc, n_features, feature_names, max_instances, allow_batch)


def parse_predict_doc(
    doc: dict[str, Any],
    n_features: int,
    feature_names: list[str],
    max_instances: int,
    allow_batch: bool,
) -> ParsedRequest:
    """Validate an already-decoded prediction object (see :func:`parse_predict`)."""
    request_id = doc.get("request_id")
    if request_id is not None and (
        not isinstance(request_id, str)
        or not 0 < len(request_id) <= _MAX_REQUEST_ID
        or not (request_id.isascii() and request_id.isprintable())  # it goes in a header
    ):
        raise ValidationFailed(
            f"request_id must be a string of 1 to {_MAX_REQUEST_ID} printable ASCII characters"
        )
    features = doc.get("features")
    instances = doc.get("instances")
    allowed = ("features", "instances", "request_id") if allow_batch else ("features", "request_id")
    for key in doc:
        if key not in allowed:
            raise ValidationFailed(
                f"unknown field {key!r}; expected {', '.join(repr(a) for a in allowed)}"
            )
    if features is not None and instances is not None:
        raise ValidationFailed("send either 'features' or 'instances', not both")
    if features is not None:
        _check_row(features, n_features, feature_names, "features")
        rows = _to_array(features).reshape(1, n_features)
        batch = False
    elif instances is not None:
        if not isinstance(instances, list) or not instances:
            raise ValidationFailed("instances must be a non-empty list of rows")
        if len(instances) > max_instances:
            raise PayloadTooLarge(
                f"{len(instances)} instances in one request; the limit is {max_instances}"
            )
        for i, row in enumerate(instances):
            _check_row(row, n_features, feature_names, f"instances[{i}]")
        rows = _to_array(instances)
        batch = True
    else:
        expected = "'features' (or 'instances')" if allow_batch else "'features'"
        raise ValidationFailed(f"missing field {expected}")
    # No finiteness check: orjson refuses NaN and Infinity, and parses every number it accepts
    # to a finite float or a 64-bit integer (the literals that overflow were refused above).
    return ParsedRequest(rows, batch, request_id)


def _check_row(row: Any, n: int, names: list[str], where: str) -> None:
    if not isinstance(row, list):
        raise ValidationFailed(f"{where} must be a list of {n} numbers, got {json_kind(row)}")
    if len(row) != n:
        raise ValidationFailed(
            f"{where} has {len(row)} values; the model expects {n} ({', '.join(names)})"
        )
    for i, value in enumerate(row):
        if type(value) not in _NUMBER:  # bool is not a number here
            raise ValidationFailed(
                f"{where}[{i}] ({names[i]}) must be a number, got {json_kind(value)}"
            )


def _to_array(values: list[Any]) -> FloatArray:
    try:
        return np.array(values, dtype=np.float64)
    except OverflowError:
        raise ValidationFailed("features must be finite numbers; a value is too large") from None


def json_kind(value: Any) -> str:
    """What a JSON value is, for error messages (``a string``, ``null``...)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def render_rows(
    out: FloatArray,
    task: str,
    classes: list[int | str] | None,
    labels: list[str] | None,
) -> list[dict[str, Any]]:
    """One dict per row: ``prediction``, ``label``, ``confidence``, ``probabilities``."""
    if task != "classification" or classes is None:
        return [
            {"prediction": float(v), "label": None, "confidence": None, "probabilities": None}
            for v in np.asarray(out).reshape(-1)
        ]
    best = out.argmax(axis=1)
    rows = []
    for i, k in enumerate(best.tolist()):
        probs = out[i].tolist()
        rows.append(
            {
                "prediction": classes[k],
                "label": labels[k] if labels else str(classes[k]),
                "confidence": probs[k],
                "probabilities": probs,
            }
        )
    return rows
