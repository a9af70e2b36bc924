"""The OpenAPI document's contract layer (inferd.http.openapi); a real server is checked
against it in tests/e2e/test_openapi_contract.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from inferd.app import create_app
from inferd.http.openapi import predict_body, with_models
from inferd.http.responses import documented_methods
from inferd.settings import Settings


def _document(tmp_path: Path, **settings: Any) -> dict[str, Any]:
    app = create_app(Settings(models_dir=tmp_path, **settings))
    document: dict[str, Any] = app.api.openapi()
    return document


@pytest.fixture(scope="module")
def documents(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    root = tmp_path_factory.mktemp("openapi")
    return {"off": _document(root, auth="off"), "required": _document(root, auth="required")}


def test_every_route_has_a_contract(documents: dict[str, dict[str, Any]]) -> None:
    for document in documents.values():
        assert "x-uncovered" not in document, document["x-uncovered"]
        assert "HTTPValidationError" not in document["components"]["schemas"]


def test_errors_are_documented_with_their_bodies(documents: dict[str, dict[str, Any]]) -> None:
    for document in documents.values():
        for path, operations in document["paths"].items():
            for method, op in operations.items():
                for status, answer in op["responses"].items():
                    if int(status) < 400:
                        continue
                    schema = answer["content"]["application/json"]["schema"]
                    refs = {s.get("$ref") for s in schema.get("anyOf", [schema])}
                    if path.startswith("/openai/"):
                        assert refs == {"#/components/schemas/OpenAIError"}, (path, status)
                    elif path.endswith("/ready") and refs == {None}:
                        assert status == "503"  # a readiness document, not an error
                    elif not path.startswith("/v2"):
                        assert "#/components/schemas/ErrorBody" in refs, (method, path, status)
    paths = documents["off"]["paths"]
    assert set(paths["/v1/requests"]["post"]["responses"]) == {
        "202", "400", "404", "409", "413", "415", "422", "429", "503"
    }  # fmt: skip
    assert "Retry-After" in paths["/v1/requests"]["post"]["responses"]["503"]["headers"]
    assert list(paths["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    events = paths["/v1/requests/{request_id}/events"]["get"]
    assert list(events["responses"]["200"]["content"]) == ["text/event-stream"]
    (last_event_id,) = [p for p in events["parameters"] if p["name"] == "Last-Event-ID"]
    assert last_event_id["schema"]["type"] == "integer"
    (limit,) = paths["/v1/requests"]["get"]["parameters"][1:]
    assert (limit["schema"]["minimum"], limit["schema"]["maximum"]) == (1, 100)
    (window,) = paths["/v1/stats"]["get"]["parameters"]
    assert (window["schema"]["minimum"], window["schema"]["maximum"]) == (1, 60)


def test_keys_add_their_answers_only_when_on(documents: dict[str, dict[str, Any]]) -> None:
    off, on = documents["off"], documents["required"]
    assert "securitySchemes" not in off["components"]
    assert set(on["components"]["securitySchemes"]) == {"bearer", "apiKey"}
    submit_off = off["paths"]["/v1/requests"]["post"]["responses"]
    submit_on = on["paths"]["/v1/requests"]["post"]["responses"]
    assert "401" not in submit_off and "403" not in submit_off
    assert {"401", "403", "429"} <= set(submit_on)
    usage = on["paths"]["/v1/usage"]["get"]["responses"]  # any valid key: no scope to lack
    assert "401" in usage and "403" not in usage
    health = on["paths"]["/health"]["get"]
    assert health["security"] == [] and set(health["responses"]) == {"200"}


def test_the_feature_count_is_stated_where_one_count_holds(
    documents: dict[str, dict[str, Any]],
) -> None:
    counts = {None: 4, "*": None}
    document = with_models(documents["off"], counts.get, 8)
    paths = document["paths"]
    single = paths["/predict"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert single == predict_body(4, 8, batch=False)
    assert single["properties"]["features"]["minItems"] == 4
    assert single["additionalProperties"] is False
    named = paths["/v1/models/{name}/predict"]["post"]["requestBody"]["content"]
    features = named["application/json"]["schema"]["oneOf"][0]["properties"]["features"]
    assert "minItems" not in features  # models of different counts: not expressible
    batch = named["application/json"]["schema"]["oneOf"][1]["properties"]["instances"]
    assert batch["maxItems"] == 8
    submit = paths["/v1/requests"]["post"]["requestBody"]["content"]["application/json"]
    assert "type" not in submit["schema"]["properties"]["input"]  # any model's input
    every = with_models(documents["off"], {None: 4, "*": 4, "requests": 4}.get, 8)["paths"]
    body = every["/v1/requests"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert body["properties"]["input"] == predict_body(4, 8, batch=True)


def test_documented_methods_match_path_templates(documents: dict[str, dict[str, Any]]) -> None:
    document = documents["off"]
    assert documented_methods(document, "/v1/requests") == ["GET", "POST"]
    assert documented_methods(document, "/v1/models/iris/versions/2/predict") == ["POST"]
    assert documented_methods(document, "/v1/models/iris/versions/2/predict/x") == []
