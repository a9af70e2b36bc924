"""Parsing of prediction bodies and rendering of the per-row results."""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
import pytest

from inferd.codec import ParsedRequest, parse_predict, render_rows
from inferd.errors import BadRequest, InferdError, PayloadTooLarge, ValidationFailed

NAMES = ["sepal_length_cm", "sepal_width_cm", "petal_length_cm", "petal_width_cm"]
ROW = [5.1, 3.5, 1.4, 0.2]


def parse(
    body: bytes | dict[str, Any], max_instances: int = 8, allow_batch: bool = True
) -> ParsedRequest:
    raw = body if isinstance(body, bytes) else orjson.dumps(body)
    return parse_predict(raw, len(NAMES), NAMES, max_instances, allow_batch)


def refusal(body: bytes | dict[str, Any], **kwargs: Any) -> InferdError:
    with pytest.raises(InferdError) as info:
        parse(body, **kwargs)
    return info.value


# --- accepted bodies ------------------------------------------------------------------------


def test_single_row_becomes_one_float_row() -> None:
    parsed = parse({"features": [5, 3.5, 1.4, 0]})

    assert isinstance(parsed, ParsedRequest)
    assert parsed.batch is False
    assert parsed.request_id is None
    assert parsed.rows.dtype == np.float64
    assert parsed.rows.tolist() == [[5.0, 3.5, 1.4, 0.0]]


def test_batch_form_keeps_row_order() -> None:
    parsed = parse({"instances": [ROW, [6.0, 2.9, 4.5, 1.5], [7, 3, 6, 2]]})

    assert parsed.batch is True
    assert parsed.rows.shape == (3, 4)
    assert parsed.rows[:, 0].tolist() == [5.1, 6.0, 7.0]


def test_instances_exactly_at_the_limit_are_accepted() -> None:
    assert parse({"instances": [ROW] * 8}, max_instances=8).rows.shape == (8, 4)


@pytest.mark.parametrize("request_id", ["a", "req-42", "x" * 128])
def test_request_id_is_returned(request_id: str) -> None:
    assert parse({"features": ROW, "request_id": request_id}).request_id == request_id


def test_integers_beyond_64_bits_that_fit_a_float_are_accepted() -> None:
    parsed = parse(b'{"features": [18446744073709551616, 1, 2, 3]}')

    assert parsed.rows[0, 0] == 2.0**64


# --- 400: unreadable bodies -----------------------------------------------------------------


@pytest.mark.parametrize("body", [b"", b"{", b'{"features": [1, 2, 3, 4]', b"features=1,2,3,4"])
def test_malformed_json_is_a_bad_request(body: bytes) -> None:
    error = refusal(body)

    assert isinstance(error, BadRequest)
    assert error.status_code == 400
    assert "not valid JSON" in error.message


@pytest.mark.parametrize(
    ("body", "kind"),
    [(b"[5.1, 3.5, 1.4, 0.2]", "a list"), (b'"hello"', "a string"), (b"null", "null")],
)
def test_body_must_be_an_object(body: bytes, kind: str) -> None:
    error = refusal(body)

    assert isinstance(error, BadRequest)
    assert error.message == f"request body must be a JSON object, got {kind}"


# --- 422: readable but wrong ----------------------------------------------------------------


@pytest.mark.parametrize("request_id", [42, True, ["a"], "", "x" * 129])
def test_request_id_must_be_a_short_string(request_id: Any) -> None:
    error = refusal({"features": ROW, "request_id": request_id})

    assert isinstance(error, ValidationFailed)
    assert error.status_code == 422
    assert "request_id must be a string of 1 to 128 printable ASCII characters" in error.message


def test_unknown_field_is_named() -> None:
    error = refusal({"features": ROW, "inputs": ROW})

    assert isinstance(error, ValidationFailed)
    assert "unknown field 'inputs'" in error.message
    assert "'features', 'instances', 'request_id'" in error.message


def test_features_and_instances_together_are_refused() -> None:
    error = refusal({"features": ROW, "instances": [ROW]})

    assert isinstance(error, ValidationFailed)
    assert "not both" in error.message


@pytest.mark.parametrize("body", [{}, {"request_id": "r1"}, {"features": None}])
def test_missing_features(body: dict[str, Any]) -> None:
    error = refusal(body)

    assert isinstance(error, ValidationFailed)
    assert error.message == "missing field 'features' (or 'instances')"


@pytest.mark.parametrize("values", [[], [1.0, 2.0, 3.0], [1, 2, 3, 4, 5]])
def test_wrong_feature_count_names_the_expected_features(values: list[float]) -> None:
    error = refusal({"features": values})

    assert isinstance(error, ValidationFailed)
    assert error.message == (
        f"features has {len(values)} values; the model expects 4 "
        "(sepal_length_cm, sepal_width_cm, petal_length_cm, petal_width_cm)"
    )


def test_wrong_count_in_a_batch_names_the_row() -> None:
    error = refusal({"instances": [ROW, [1.0, 2.0]]})

    assert isinstance(error, ValidationFailed)
    assert error.message.startswith("instances[1] has 2 values; the model expects 4")


@pytest.mark.parametrize(
    ("value", "kind"),
    [("5.1", "a string"), (None, "null"), (True, "a boolean"), (False, "a boolean")],
)
def test_non_numbers_are_refused(value: Any, kind: str) -> None:
    error = refusal({"features": [1.0, value, 3.0, 4.0]})

    assert isinstance(error, ValidationFailed)
    assert error.message == f"features[1] (sepal_width_cm) must be a number, got {kind}"


def test_non_number_in_a_batch_names_row_and_feature() -> None:
    error = refusal({"instances": [ROW, [1.0, 2.0, 3.0, "x"]]})

    assert isinstance(error, ValidationFailed)
    assert error.message == "instances[1][3] (petal_width_cm) must be a number, got a string"


def test_nested_lists_are_refused() -> None:
    wrapped = refusal({"features": [ROW]})
    per_value = refusal({"features": [[v] for v in ROW]})

    assert isinstance(wrapped, ValidationFailed)
    assert "features has 1 values; the model expects 4" in wrapped.message
    assert isinstance(per_value, ValidationFailed)
    assert per_value.message == "features[0] (sepal_length_cm) must be a number, got a list"


@pytest.mark.parametrize("features", [{"a": 1}, "5.1,3.5,1.4,0.2", 5.1])
def test_features_must_be_a_list(features: Any) -> None:
    error = refusal({"features": features})

    assert isinstance(error, ValidationFailed)
    assert error.message.startswith("features must be a list of 4 numbers")


@pytest.mark.parametrize(
    "literal", [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", str(10**400).encode()]
)
def test_non_finite_numbers_are_refused(literal: bytes) -> None:
    error = refusal(b'{"features": [1.0, ' + literal + b", 3.0, 4.0]}")

    assert isinstance(error, ValidationFailed)
    assert error.status_code == 422
    assert "features must be finite numbers" in error.message


def test_non_finite_number_in_a_batch_is_refused() -> None:
    error = refusal(b'{"instances": [[1, 2, 3, 4], [1, 2, 3, 1e999]]}')

    assert isinstance(error, ValidationFailed)
    assert "finite numbers" in error.message


def test_malformed_json_mentioning_nan_in_a_string_is_still_a_bad_request() -> None:
    error = refusal(b'{"request_id": "NaN-check", "features": [1, 2, 3, 4]')

    assert isinstance(error, BadRequest)


def test_too_many_instances_is_payload_too_large() -> None:
    error = refusal({"instances": [ROW] * 9}, max_instances=8)

    assert isinstance(error, PayloadTooLarge)
    assert error.status_code == 413
    assert error.message == "9 instances in one request; the limit is 8"


@pytest.mark.parametrize("instances", [[], {}, "rows", 3])
def test_instances_must_be_a_non_empty_list(instances: Any) -> None:
    error = refusal({"instances": instances})

    assert isinstance(error, ValidationFailed)
    assert error.message == "instances must be a non-empty list of rows"


def test_batch_form_can_be_disabled() -> None:
    batch = refusal({"instances": [ROW]}, allow_batch=False)
    empty = refusal({}, allow_batch=False)

    assert isinstance(batch, ValidationFailed)
    assert "unknown field 'instances'; expected 'features', 'request_id'" in batch.message
    assert empty.message == "missing field 'features'"
    assert parse({"features": ROW}, allow_batch=False).rows.shape == (1, 4)


# --- rendering ------------------------------------------------------------------------------


def test_render_classification_rows() -> None:
    out = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]])

    rows = render_rows(out, "classification", [0, 1, 2], ["setosa", "versicolor", "virginica"])

    assert rows == [
        {
            "prediction": 0,
            "label": "setosa",
            "confidence": 0.7,
            "probabilities": [0.7, 0.2, 0.1],
        },
        {
            "prediction": 2,
            "label": "virginica",
            "confidence": 0.6,
            "probabilities": [0.1, 0.3, 0.6],
        },
    ]
    assert orjson.loads(orjson.dumps(rows)) == rows  # plain JSON types only


def test_render_classification_with_string_classes_and_no_labels() -> None:
    rows = render_rows(np.array([[0.25, 0.75]]), "classification", ["no", "yes"], None)

    assert rows == [
        {"prediction": "yes", "label": "yes", "confidence": 0.75, "probabilities": [0.25, 0.75]}
    ]


def test_render_regression_rows() -> None:
    rows = render_rows(np.array([1.5, -2.0]), "regression", None, None)

    assert rows == [
        {"prediction": 1.5, "label": None, "confidence": None, "probabilities": None},
        {"prediction": -2.0, "label": None, "confidence": None, "probabilities": None},
    ]
    assert all(type(row["prediction"]) is float for row in rows)
