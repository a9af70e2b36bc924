"""The HTTP side of each client method, shared by :class:`Client` and :class:`AsyncClient`.

Each builder returns a :class:`Call`: what to send, whether it is safe to send twice, and how
to read the answer. The two clients differ only in how they send it (blocking or awaited).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Generic, TypeVar
from urllib.parse import quote

import httpx
import numpy as np

from inferd import __version__
from inferd.client._tensors import decode_tensor, encode_inputs
from inferd.client.errors import ConnectionFailed, InferdClientError, NotFound, Timeout
from inferd.client.types import (
    Classification,
    Health,
    InferResult,
    ModelInfo,
    Prediction,
    RequestInfo,
    Submitted,
    Usage,
)

__all__ = ["DEFAULT_URL", "Call", "transport_error"]

T = TypeVar("T")

DEFAULT_URL = "http://127.0.0.1:8000"
MAX_PAGE = 100  # the server's largest page of GET /v1/requests


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One HTTP exchange and how to read its answer."""

    method: str
    path: str
    parse: Callable[[httpx.Response], T]
    idempotent: bool = True
    """Safe to send again when no answer came or the server said "not now" (503, 429)."""
    json: Any = None
    content: bytes | None = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    accept: frozenset[int] = frozenset()
    """Non-2xx statuses that are an answer, not an error (readiness says 503 when not ready)."""


def settings(
    base_url: str | None, api_key: str | None, headers: Mapping[str, str] | None
) -> tuple[str, dict[str, str]]:
    """The base URL (argument, INFERD_URL, or the default) and the headers every call sends."""
    url = (base_url or os.environ.get("INFERD_URL") or DEFAULT_URL).rstrip("/")
    key = api_key if api_key is not None else os.environ.get("INFERD_API_KEY")
    sent = {"user-agent": f"inferd-client/{__version__}", "accept": "application/json"}
    if key:
        sent["authorization"] = f"Bearer {key}"
    sent.update(headers or {})
    return url, sent


def transport_error(exc: httpx.TransportError, base_url: str) -> InferdClientError:
    """The client error for a request that got no answer."""
    detail = str(exc) or type(exc).__name__
    if isinstance(exc, httpx.TimeoutException):
        return Timeout(f"no answer from {base_url} in time: {detail}", retryable=True)
    return ConnectionFailed(f"could not reach {base_url}: {detail}", retryable=True)


def _part(value: str | int) -> str:
    return quote(str(value), safe="")


def _rows(value: Any) -> Any:
    return value.tolist() if isinstance(value, np.ndarray) else value


def _json(response: httpx.Response) -> Any:
    try:
        return response.json()
    except ValueError:
        raise InferdClientError(
            f"the server answered {response.status_code} with a body that is not JSON",
            code="bad_response",
            status=response.status_code,
        ) from None


# ---------------------------------------------------------------- synchronous predictions


def predict(
    features: Any, model: str | None, version: str | int | None, request_id: str | None
) -> Call[Prediction]:
    body: dict[str, Any] = {"features": _rows(features)}
    if request_id is not None:
        body["request_id"] = request_id
    if model is None:
        path = "/predict"
    elif version is None:
        path = f"/v1/models/{_part(model)}/predict"
    else:
        path = f"/v1/models/{_part(model)}/versions/{_part(version)}/predict"

    def parse(response: httpx.Response) -> Prediction:
        doc = _json(response)
        return Prediction.from_row(doc, doc)

    return Call("POST", path, parse, json=body)


def predict_batch(
    rows: Any, model: str, version: str | int | None, request_id: str | None
) -> Call[list[Prediction]]:
    body: dict[str, Any] = {"instances": _rows(rows)}
    if request_id is not None:
        body["request_id"] = request_id
    path = f"/v1/models/{_part(model)}"
    path += "/predict" if version is None else f"/versions/{_part(version)}/predict"

    def parse(response: httpx.Response) -> list[Prediction]:
        doc = _json(response)
        return [Prediction.from_row(row, doc) for row in doc["predictions"]]

    return Call("POST", path, parse, json=body)


_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


def image_type(data: bytes) -> str:
    """The image's media type from its first bytes (the server reads the image either way)."""
    for magic, media in _MAGIC:
        if data.startswith(magic):
            return media
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return "application/octet-stream"


def read_image(image: bytes | str | Path) -> bytes:
    if isinstance(image, bytes | bytearray | memoryview):
        return bytes(image)
    path = Path(image)
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ValueError(f"cannot read image {str(path)!r}: {exc.strerror or exc}") from None


def classify(image: bytes, model: str, top_k: int | None) -> Call[Classification]:
    params = {"top_k": top_k} if top_k is not None else None

    def parse(response: httpx.Response) -> Classification:
        return Classification.from_json(_json(response))

    return Call(
        "POST",
        f"/v1/models/{_part(model)}/classify",
        parse,
        content=image,
        params=params,
        headers={"content-type": image_type(image)},
    )


def _v2_path(model: str, version: str | int | None) -> str:
    path = f"/v2/models/{_part(model)}"
    return path if version is None else f"{path}/versions/{_part(version)}"


def v2_input_names(model: str, version: str | int | None) -> Call[list[dict[str, Any]]]:
    """The model's declared inputs (V2 model metadata), to name a list of bare arrays."""

    def parse(response: httpx.Response) -> list[dict[str, Any]]:
        doc = _json(response)
        inputs = doc.get("inputs") if isinstance(doc, dict) else None
        return [i for i in inputs or [] if isinstance(i, dict) and "name" in i]

    return Call("GET", _v2_path(model, version), parse)


def infer(
    model: str,
    inputs: Mapping[str, Any] | Sequence[Any],
    version: str | int | None,
    declared: list[dict[str, Any]] | None,
    parameters: dict[str, Any] | None,
    request_id: str | None,
    outputs: Sequence[str] | None,
) -> Call[InferResult]:
    names = [str(i["name"]) for i in declared] if declared else None
    tensors = encode_inputs(inputs, names)
    if declared and not isinstance(inputs, Mapping):
        types = {str(i["name"]): i.get("datatype") for i in declared}
        for tensor in tensors:  # a float64 array for an FP32 input: send what the model takes
            wanted = types.get(tensor["name"])
            if isinstance(wanted, str) and wanted != tensor["datatype"] and wanted != "BYTES":
                tensor["datatype"] = wanted
    body: dict[str, Any] = {"inputs": tensors}
    if request_id is not None:
        body["id"] = request_id
    if parameters:
        body["parameters"] = parameters
    if outputs:
        body["outputs"] = [{"name": name} for name in outputs]

    def parse(response: httpx.Response) -> InferResult:
        doc = _json(response)
        return InferResult(
            model_name=doc.get("model_name", model),
            model_version=doc.get("model_version"),
            id=doc.get("id"),
            outputs={str(t["name"]): decode_tensor(t) for t in doc.get("outputs", [])},
            parameters=dict(doc.get("parameters") or {}),
        )

    return Call("POST", _v2_path(model, version) + "/infer", parse, json=body)


# ---------------------------------------------------------------- long-running requests


def submit(
    model: str,
    input: Any,
    parameters: dict[str, Any] | None,
    idempotency_key: str | None,
    auto_key: bool,
    ttl_seconds: float | None = None,
) -> Call[Submitted]:
    key = (
        idempotency_key
        if idempotency_key is not None
        else (f"inferd-client-{uuid.uuid4().hex}" if auto_key else None)
    )
    body: dict[str, Any] = {"model": model, "input": _rows(input)}
    if parameters:
        body["parameters"] = parameters
    if ttl_seconds is not None:
        body["ttl_seconds"] = ttl_seconds
    headers = {"idempotency-key": key} if key is not None else {}

    def parse(response: httpx.Response) -> Submitted:
        replayed = response.headers.get("idempotent-replayed", "").lower() == "true"
        return Submitted.from_json(_json(response), replayed, key)

    # Without a key a second POST would create a second request: never sent twice.
    return Call("POST", "/v1/requests", parse, idempotent=key is not None, json=body,
                headers=headers)  # fmt: skip


def _record(response: httpx.Response) -> RequestInfo:
    return RequestInfo.from_json(_json(response))


def get(request_id: str) -> Call[RequestInfo]:
    return Call("GET", f"/v1/requests/{_part(request_id)}", _record)


def cancel(request_id: str) -> Call[RequestInfo]:
    # Cancelling twice is the same as once.
    return Call("POST", f"/v1/requests/{_part(request_id)}/cancel", _record)


def page(cursor: str | None, size: int) -> Call[tuple[list[RequestInfo], str | None]]:
    params: dict[str, Any] = {"limit": size}
    if cursor is not None:
        params["cursor"] = cursor

    def parse(response: httpx.Response) -> tuple[list[RequestInfo], str | None]:
        doc = _json(response)
        return [RequestInfo.from_json(r) for r in doc["requests"]], doc.get("next_cursor")

    return Call("GET", "/v1/requests", parse, params=params)


def page_size(limit: int | None, page_size: int, seen: int) -> int:
    if not 1 <= page_size <= MAX_PAGE:
        raise ValueError(f"page_size must be between 1 and {MAX_PAGE}, got {page_size}")
    return page_size if limit is None else max(1, min(page_size, limit - seen))


def events_path(request_id: str) -> str:
    return f"/v1/requests/{_part(request_id)}/events"


# ---------------------------------------------------------------- metadata


def usage() -> Call[Usage]:
    return Call("GET", "/v1/usage", lambda r: Usage.from_json(_json(r)))


def models() -> Call[tuple[str | None, list[ModelInfo]]]:
    def parse(response: httpx.Response) -> tuple[str | None, list[ModelInfo]]:
        doc = _json(response)
        return doc.get("default"), [ModelInfo.from_json(m) for m in doc.get("models", [])]

    return Call("GET", "/v1/models", parse)


def model(name: str) -> Call[ModelInfo]:
    return Call("GET", f"/v1/models/{_part(name)}", lambda r: ModelInfo.from_json(_json(r)))


def health() -> Call[Health]:
    def parse(response: httpx.Response) -> Health:
        doc = _json(response)
        return Health(
            ready=response.status_code == 200 and doc.get("status") == "ready",
            status=str(doc.get("status", "")),
            models={str(k): str(v) for k, v in (doc.get("models") or {}).items()},
            error=doc.get("error"),
        )

    return Call("GET", "/health/ready", parse, accept=frozenset({503}))


def no_default_model() -> InferdClientError:
    return NotFound(
        "the server has no default model; pass model=...", code="model_not_found", status=None
    )
