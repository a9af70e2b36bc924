"""The OpenAPI document as a contract: every status a route can answer, with its body.

FastAPI documents what its handlers return and the 422 of what it parses. inferd also answers
before a handler runs (keys, scopes and rates in the request middleware; the lean path), and
its handlers raise :class:`~inferd.errors.InferdError` subclasses that become 400, 404, 409,
413, 415, 422, 429, 503 and 504. :func:`contract` rewrites FastAPI's document to say all of it:

- :data:`ROUTE_ERRORS`: the error statuses of each route (its own and FastAPI's parsing), and
  only those (FastAPI's blanket 422 goes where nothing is parsed);
- keys on: 401 on every route that needs a key, 403, 429 and 503 (limits store down, when
  it fails closed) where it needs a scope, and the two ways to present a key as security;
- error bodies: ``{"error": {"code", "message", "retryable"}}`` (:mod:`inferd.errors`), the
  V2 protocol's ``{"error": "..."}`` on the ``/v2`` routes' own errors, OpenAI's shape on
  ``/openai/``; ``Retry-After`` where the answer says when to retry;
- parameter constraints the handlers check themselves (``limit``, ``window``,
  ``Last-Event-ID``).

Model-dependent constraints (the feature count of ``/predict``) are laid over it per request
by :func:`with_models`, since models load, unload and change default at run time.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

from inferd.http.schemas import ErrorBody, SubmitBody
from inferd.models.registry import ModelRegistry
from inferd.tenancy.auth import required_scope

__all__ = ["ROUTE_ERRORS", "contract", "install_contract", "predict_body", "with_models"]

_MAX_SEQ = 2**63 - 1

_DESCRIPTIONS = {
    400: "The request could not be read: malformed JSON, a bad header or parameter",
    401: "No valid API key (Authorization: Bearer <key>, or X-API-Key)",
    403: "The key lacks the scope this route needs",
    404: "No such model, version or request (or it is someone else's)",
    405: "The path exists; the method does not",
    409: "A conflict: a reused idempotency key, or a version that failed to load",
    413: "The body, or the number of instances, is over the limit",
    415: "Content-Type is not one the route takes",
    422: "The request was read, but its content is wrong",
    429: "Over the key's rate or daily token budget; see Retry-After",
    500: "The model failed on the batch this request was in",
    503: "Overloaded, the model not ready, or a store unavailable; see Retry-After",
    504: "The deadline passed before the model answered",
}

_PREDICT = (400, 404, 413, 415, 422, 500, 503, 504)
_IMAGE = (400, 404, 413, 415, 422, 500, 503, 504)
_TEXT = (400, 404, 413, 415, 500, 503, 504)  # OpenAI's shape: a 422 is a 400 there
_STORE = 503  # the request store (database) did not answer

ROUTE_ERRORS: dict[tuple[str, str], tuple[int, ...]] = {
    ("GET", "/health"): (),
    ("GET", "/health/live"): (),
    ("GET", "/health/ready"): (),
    ("GET", "/metrics"): (),
    ("GET", "/v1/models"): (),
    ("GET", "/v1/models/{name}"): (404, 503),
    ("GET", "/v1/models/{name}/versions/{version}"): (404, 422, 503),
    ("GET", "/v1/models/{name}/ready"): (404,),
    ("GET", "/v1/models/{name}/versions/{version}/ready"): (404, 422),
    ("GET", "/v1/models/{name}/drift"): (404, 503),
    ("POST", "/predict"): _PREDICT,
    ("POST", "/v1/models/{name}/predict"): _PREDICT,
    ("POST", "/v1/models/{name}/versions/{version}/predict"): _PREDICT,
    ("POST", "/v1/models/{name}/classify"): (*_IMAGE, 422),
    ("POST", "/v1/predict"): _IMAGE,
    # 503 also when the model's queue is full (queue_full), 429 past a key's queued cap.
    ("POST", "/v1/requests"): (400, 404, 409, 413, 415, 422, 429, _STORE),
    ("GET", "/v1/requests"): (400, 422, _STORE),
    ("GET", "/v1/requests/{request_id}"): (404, _STORE),
    ("POST", "/v1/requests/{request_id}/cancel"): (404, _STORE),
    ("GET", "/v1/requests/{request_id}/events"): (400, 404, _STORE),
    ("GET", "/v1/admin/requests"): (400, 422, _STORE),
    ("POST", "/v1/admin/requests/{request_id}/requeue"): (400, 404, 409, 422, _STORE),
    ("GET", "/v1/admin/models/{name}/split"): (404, 503),
    ("PUT", "/v1/admin/models/{name}/split"): (400, 404, 422, 503),
    ("DELETE", "/v1/admin/models/{name}/split"): (404, 503),
    ("GET", "/v1/admin/repository"): (),
    ("POST", "/v1/admin/models/{name}/load"): (400, 404, 409, 422),
    ("POST", "/v1/admin/models/{name}/unload"): (404,),
    ("POST", "/v1/admin/models/{name}/default"): (400, 404, 409, 422),
    ("GET", "/v1/usage"): (),
    ("GET", "/v1/stats"): (400, 422),
    ("GET", "/v2"): (),
    ("GET", "/v2/health/live"): (),
    ("GET", "/v2/health/ready"): (400,),
    ("GET", "/v2/models/{name}"): (400, 404, 503),
    ("GET", "/v2/models/{name}/versions/{version}"): (400, 404, 503),
    ("GET", "/v2/models/{name}/ready"): (400, 404, 503),
    ("GET", "/v2/models/{name}/versions/{version}/ready"): (400, 404, 503),
    ("POST", "/v2/models/{name}/infer"): (400, 404, 413, 415, 500, 503, 504),
    ("POST", "/v2/models/{name}/versions/{version}/infer"): (400, 404, 413, 415, 500, 503, 504),
    ("POST", "/v2/repository/index"): (400, 413),
    ("POST", "/v2/repository/models/{name}/load"): (400, 404, 409, 413),
    ("POST", "/v2/repository/models/{name}/unload"): (400, 404, 413),
    ("POST", "/openai/v1/completions"): (*_TEXT, 429),
    ("POST", "/openai/v1/chat/completions"): (*_TEXT, 429),
    ("GET", "/openai/v1/models"): (),
    ("GET", "/openai/v1/models/{model_id}"): (404,),
}
"""The error statuses each route answers by itself (keys and scopes aside)."""
_UNKNOWN = (400, 404, 422)  # a route missing above (tests/unit/test_openapi.py fails)

# A V2 route's "not ready" is a 400 with the protocol's body, not an error: the status is the
# answer (see inferd.http.v2). Those routes' 200/400 bodies are documented as they are.
_V2_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {"type": "string"}},
    "description": "The Open Inference Protocol's error body",
}
_OPENAI_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
    "description": "OpenAI's error body",
}
_RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before retrying",
        "required": False,
        "schema": {"type": "string", "pattern": "^[0-9]+$"},
    }
}
_PARAMETERS: dict[tuple[str, str, str], dict[str, Any]] = {
    ("GET", "/v1/requests", "limit"): {
        "type": "integer",
        "minimum": 1,
        "maximum": 100,
        "default": 20,
    },
    ("GET", "/v1/admin/requests", "limit"): {
        "type": "integer",
        "minimum": 1,
        "maximum": 100,
        "default": 20,
    },
    ("GET", "/v1/stats", "window"): {"type": "number", "minimum": 1, "maximum": 60, "default": 10},
    ("POST", "/v1/requests", "Idempotency-Key"): {
        "type": "string",
        "minLength": 1,
        "maxLength": 255,
    },
    ("GET", "/v1/requests/{request_id}/events", "Last-Event-ID"): {
        "type": "integer",
        "minimum": 0,
        "maximum": _MAX_SEQ,
    },
}
for _path in ("/v1/models/{name}/versions/{version}/predict",):
    _PARAMETERS["POST", _path, "version"] = {"type": "integer", "minimum": 0}
_SECURITY_SCHEMES = {
    "bearer": {"type": "http", "scheme": "bearer", "description": "An inferd API key"},
    "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
}


def _family(path: str) -> str:
    if path.startswith("/openai/"):
        return "openai"
    if path == "/v2" or path.startswith("/v2/"):
        return "v2"
    return "inferd"


def contract(doc: dict[str, Any], *, auth: bool) -> dict[str, Any]:
    """``doc`` (FastAPI's document) rewritten to say what the server answers. ``auth``: keys
    are required (401, 403, 429 and security on the routes that need them)."""
    doc = copy.deepcopy(doc)
    schemas = doc.setdefault("components", {}).setdefault("schemas", {})
    for name, schema in ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")[
        "$defs"
    ].items():
        schemas[name] = schema
    error_schema = ErrorBody.model_json_schema(ref_template="#/components/schemas/{model}")
    error_schema.pop("$defs", None)
    schemas["ErrorBody"] = error_schema
    schemas["V2ErrorBody"] = _V2_ERROR  # what inferd.http.schemas.V2ErrorBody says
    schemas["OpenAIError"] = _OPENAI_ERROR
    for gone in ("HTTPValidationError", "ValidationError"):
        schemas.pop(gone, None)
    refs = {
        "inferd": {"$ref": "#/components/schemas/ErrorBody"},
        "v2": {"$ref": "#/components/schemas/V2ErrorBody"},
        "openai": {"$ref": "#/components/schemas/OpenAIError"},
    }
    missing = []
    for path, operations in doc.get("paths", {}).items():
        for method, op in operations.items():
            key = (method.upper(), path)
            family = _family(path)
            if key not in ROUTE_ERRORS:  # a test says so (uncovered); FastAPI's own meanwhile
                missing.append(f"{key[0]} {path}")
            own = set(ROUTE_ERRORS.get(key, _UNKNOWN))
            gate: set[int] = set()
            scope = required_scope(key[0], path)
            if auth and scope is not None:
                gate.add(401)
                if scope:
                    gate.update((403, 429, 503))
                op["security"] = [{"bearer": []}, {"apiKey": []}]
            elif auth:
                op["security"] = []
            responses: dict[str, Any] = {}
            for code, answer in op.get("responses", {}).items():
                # Kept: successes, and other answers a route documents with a body of its
                # own (a readiness document on 503); errors are rebuilt below.
                if not code.isdigit() or int(code) < 400 or _own_body(answer):
                    responses[code] = answer
            for status in sorted(own | gate):
                shapes = _error_shapes(family, status, status in own, status in gate, refs)
                documented = responses.get(str(status))
                if documented is not None:
                    shapes.insert(0, documented["content"]["application/json"]["schema"])
                answer = {
                    "description": _DESCRIPTIONS[status]
                    if documented is None
                    else f"{documented['description']}; or an error",
                    "content": {
                        "application/json": {
                            "schema": shapes[0] if len(shapes) == 1 else {"anyOf": shapes}
                        }
                    },
                }
                if status in (429, 503):
                    answer["headers"] = copy.deepcopy(_RETRY_AFTER)
                responses[str(status)] = answer
            op["responses"] = responses
            for param in op.get("parameters", ()):
                constraint = _PARAMETERS.get((key[0], path, param["name"]))
                if constraint is not None:
                    description = param.get("description") or param["schema"].get("description")
                    param["schema"] = dict(constraint)
                    if description:
                        param["schema"]["description"] = description
    if missing:
        doc["x-uncovered"] = missing
    if auth:
        doc["components"]["securitySchemes"] = _SECURITY_SCHEMES
    return doc


def _own_body(answer: dict[str, Any]) -> bool:
    schema = answer.get("content", {}).get("application/json", {}).get("schema")
    if not schema:
        return False
    ref = str(schema.get("$ref", ""))
    return ref.rsplit("/", 1)[-1] not in ("ErrorBody", "V2ErrorBody", "HTTPValidationError")


def _error_shapes(
    family: str, status: int, own: bool, gate: bool, refs: dict[str, dict[str, str]]
) -> list[dict[str, Any]]:
    """The bodies of an error status: the middleware's refusals (``gate``) are inferd's
    error body everywhere but /openai/ (which reshapes every error); a route's own errors are
    its family's, except FastAPI's parsing errors (422) on V2 routes."""
    if family == "openai":
        return [refs["openai"]]
    shapes = []
    if own:
        shapes.append(refs["inferd"] if family == "v2" and status == 422 else refs[family])
    if gate and refs["inferd"] not in shapes:
        shapes.append(refs["inferd"])
    return shapes


def with_models(
    doc: dict[str, Any], features: Callable[[str | None], int | None], max_instances: int
) -> dict[str, Any]:
    """``doc`` with the prediction bodies said exactly: one of ``features`` or
    ``instances`` (at most ``max_instances`` rows), with the feature count where one count
    holds: ``features(None)`` for the default model's ``/predict``, ``features("*")`` when
    every served model is tabular with the same count (the named routes), and
    ``features("requests")`` when they also neither stream nor check their own requests (the
    ``input`` of ``POST /v1/requests``, which then takes no ``parameters``)."""
    doc = copy.deepcopy(doc)
    paths = doc.get("paths", {})
    every = features("*")
    for path, n, batch in (
        ("/predict", features(None), False),
        ("/v1/models/{name}/predict", every, True),
        ("/v1/models/{name}/versions/{version}/predict", every, True),
    ):
        op = paths.get(path, {}).get("post")
        if op is not None:
            content = op["requestBody"]["content"]["application/json"]
            content["schema"] = predict_body(n, max_instances, batch)
    submit = paths.get("/v1/requests", {}).get("post")
    every = features("requests")
    if submit is not None and every is not None:
        content = submit["requestBody"]["content"]["application/json"]
        controls = SubmitBody.model_json_schema()["properties"]
        content["schema"] = {
            "type": "object",
            "required": ["model", "input"],
            "properties": {
                "model": {"type": "string", "minLength": 1, "examples": ["iris"]},
                "input": predict_body(every, max_instances, True),
                "parameters": {"anyOf": [{"type": "object", "maxProperties": 0}, {"type": "null"}]},
                # The queue controls, as the generic body declares them.
                "ttl_seconds": controls["ttl_seconds"],
                "expires_at": controls["expires_at"],
            },
            "additionalProperties": False,
            # One deadline or the other, not both.
            "not": {
                "required": ["ttl_seconds", "expires_at"],
                "properties": {
                    "ttl_seconds": {"not": {"type": "null"}},
                    "expires_at": {"not": {"type": "null"}},
                },
            },
        }
    return doc


def predict_body(n: int | None, max_instances: int, batch: bool) -> dict[str, Any]:
    """The JSON schema of a prediction body (see :func:`inferd.codec.parse_predict_doc`)."""
    row: dict[str, Any] = {"type": "array", "items": {"type": "number"}}
    if n is not None:
        row.update(minItems=n, maxItems=n, examples=[[5.1, 3.5, 1.4, 0.2][:n] + [0.0] * (n - 4)])
    # Printable ASCII: it is echoed in the X-Request-ID header. null is the same as none.
    request_id = {"anyOf": [{"type": "string", "pattern": "^[ -~]{1,128}$"}, {"type": "null"}]}
    single: dict[str, Any] = {
        "type": "object",
        "required": ["features"],
        "properties": {"features": row, "request_id": request_id},
        "additionalProperties": False,
    }
    if not batch:
        return single
    single["properties"]["instances"] = {"type": "null"}
    rows = {"type": "array", "items": row, "minItems": 1, "maxItems": max_instances}
    many = {
        "type": "object",
        "required": ["instances"],
        "properties": {"instances": rows, "features": {"type": "null"}, "request_id": request_id},
        "additionalProperties": False,
    }
    return {"oneOf": [single, many]}


def install_contract(
    api: FastAPI, registry: ModelRegistry, *, auth: bool, max_instances: int
) -> None:
    """Serve :func:`contract`'s document at ``/openapi.json`` (built once, on first use, from
    every route included by then), with :func:`with_models` laid over it on each request."""
    generate = api.openapi  # FastAPI's generator
    base: dict[str, Any] | None = None

    def openapi() -> dict[str, Any]:
        nonlocal base
        if base is None:
            base = contract(generate(), auth=auth)
        return with_models(base, lambda which: _features(registry, which), max_instances)

    api.openapi = openapi  # type: ignore[method-assign]


def _features(registry: ModelRegistry, which: str | None) -> int | None:
    """The feature count of the default model (``None``), or the one count every served
    model has (``"*"``: the named prediction routes; ``"requests"``: the input of a
    long-running request, which a model that streams or checks its own requests reads its
    own way). None where no single count holds, or a model is not tabular (its name
    answers 422 to any rows)."""
    served = registry.all()
    if which is None:
        served = [m for m in served if m.name == registry.default_name]
    if not served or any(m.batcher is None or m.spec.takes_images for m in served):
        return None
    if which == "requests" and any(
        m.model.capabilities.streams or m.model.capabilities.validates_requests for m in served
    ):
        return None
    counts = {m.spec.n_features for m in served}
    return counts.pop() if len(counts) == 1 else None
