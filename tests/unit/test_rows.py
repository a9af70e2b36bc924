"""Stored values of long-running requests: the JSON text written to ``json`` columns."""

from __future__ import annotations

import json

import pytest

from inferd.jobs.rows import json_text

pytestmark = pytest.mark.unit


def test_json_text_reads_back_as_the_standard_librarys_does() -> None:
    value = {"text": "héllo \u2603", "n": [1, 2.5, None, True], "nested": {"a": {"b": []}}}
    assert json.loads(json_text(value)) == json.loads(json.dumps(value)) == value


def test_json_text_keys_that_are_not_strings_become_strings_like_json_dumps() -> None:
    value = {1: "one", None: "none", 2.5: "x", False: "no"}
    assert json.loads(json_text(value)) == json.loads(json.dumps(value))


def test_json_text_writes_null_for_what_json_has_no_number_for() -> None:
    assert json.loads(json_text({"p": float("nan"), "q": float("inf")})) == {"p": None, "q": None}


def test_json_text_takes_integers_past_64_bits() -> None:
    assert json.loads(json_text({"big": 2**70})) == {"big": 2**70}


def test_json_text_refuses_what_is_not_json() -> None:
    with pytest.raises(TypeError):
        json_text({"x": object()})


def test_sqlite_columns_read_back_what_orjson_and_an_older_json_dumps_wrote() -> None:
    from inferd.jobs.lite import _json

    assert _json(json_text({"a": [1, 2.5]})) == {"a": [1, 2.5]}
    value = _json(json.dumps({"p": float("nan")}))  # an older version's NaN token
    assert value["p"] != value["p"]
    assert _json(3) == 3 and _json(None) is None  # a JSON number is stored as one
