"""pydantic models that document the JSON bodies in the OpenAPI schema (``/docs``, ``/redoc``).

The hot path validates by hand (see :mod:`inferd.codec`) to the same rules.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

__all__ = [
    "DeadLetterPage",
    "ErrorBody",
    "ModelPredictRequest",
    "ModelPredictResponse",
    "PredictRequest",
    "PredictResponse",
    "RequestAccepted",
    "RequestDoc",
    "RequeueBody",
    "SubmitBody",
    "V2ErrorBody",
    "V2InferRequest",
    "V2InferResponse",
]


class PredictRequest(BaseModel):
    """``POST /predict``: one row for the default model."""

    features: list[float] = Field(examples=[[5.1, 3.5, 1.4, 0.2]])
    """The feature values, in the order the model declares."""
    request_id: str | None = Field(default=None, max_length=128, examples=["test-001"])
    """Echoed back; defaults to the ``X-Request-ID`` header or a generated id."""


class PredictResponse(BaseModel):
    prediction: int | str | float
    """The predicted class (or value, for a regressor)."""
    confidence: float | None
    """Probability of the predicted class."""
    model_version: str
    request_id: str


class ModelPredictRequest(BaseModel):
    """``POST /v1/models/{name}/predict``: one row (``features``) or many (``instances``)."""

    features: list[float] | None = Field(default=None, examples=[[5.1, 3.5, 1.4, 0.2]])
    instances: list[list[float]] | None = Field(default=None, examples=[[[5.1, 3.5, 1.4, 0.2]]])
    request_id: str | None = Field(default=None, max_length=128)


class RowPrediction(BaseModel):
    prediction: int | str | float
    label: str | None
    confidence: float | None
    probabilities: list[float] | None


class ModelPredictResponse(BaseModel):
    """Single form: the row's fields at top level. Batch form: ``predictions``."""

    model: str
    model_version: str
    request_id: str
    prediction: int | str | float | None = None
    label: str | None = None
    confidence: float | None = None
    probabilities: list[float] | None = None
    predictions: list[RowPrediction] | None = None


class ErrorDetail(BaseModel):
    code: str
    message: str
    retryable: bool


class ErrorBody(BaseModel):
    """Every error: a stable ``code``, a message that says what to fix, and whether to retry."""

    error: ErrorDetail


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody, "description": text}
    for code, text in {
        400: "Malformed JSON or header",
        404: "Unknown model",
        413: "Body or instance count over the limit",
        415: "Content-Type is not application/json",
        422: "Wrong feature count, non-numbers, NaN or infinity",
        500: "The model failed on the batch this request was in",
        503: "Overloaded (shed) or model not ready; see Retry-After",
        504: "Deadline passed before the model answered",
    }.items()
}


# --- long-running requests (/v1/requests) -----------------------------------------------------

RequestStatusName = Literal[
    "queued", "running", "succeeded", "failed", "cancelled", "dead", "expired"
]


class SubmitBody(BaseModel):
    """``POST /v1/requests``."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(examples=["iris"])
    """A served model's name."""
    input: Any = Field(examples=[{"features": [5.1, 3.5, 1.4, 0.2]}])
    """The model's input: ``{"features": [...]}`` for tabular models, a string for text."""
    parameters: dict[str, Any] | None = Field(default=None, examples=[{"max_new_tokens": 32}])
    ttl_seconds: float | None = Field(default=None, gt=0, le=316_224_000, examples=[300])
    """How long the request may wait for a worker; not started by then, it ends ``expired``
    (with an ``error`` event). Default: the model's ``[jobs] ttl_seconds``, else the server's
    ``request_ttl_seconds`` (none by default)."""
    expires_at: str | None = Field(
        default=None, examples=["2026-12-31T12:00:00Z"], json_schema_extra={"format": "date-time"}
    )
    """The same as an instant (ISO-8601 with a time zone); give this or ``ttl_seconds``."""


class RequestAccepted(BaseModel):
    """``202`` answer of ``POST /v1/requests``."""

    id: str
    status: RequestStatusName
    """``queued``; ``succeeded`` when an identical request's stored result answered it."""
    created_at: str
    events_url: str
    expires_at: str | None
    """When it expires if no worker has started it (null: never)."""
    deduplicated: bool
    """True when an identical request answered it (a stored result, or a run it joined);
    only for models with ``[jobs] dedup = true``."""
    deduplicated_from: str | None
    """The id of that identical request."""
    result: Any = None
    """The result, when it was answered from a stored one."""


class RequestDoc(BaseModel):
    """A stored long-running request (``GET /v1/requests/{id}``)."""

    id: str
    user: str
    model: str
    version: str | None
    status: RequestStatusName
    attempts: int
    max_attempts: int
    responses: list[dict[str, Any]]
    result: Any
    error: str | None
    cancel_requested: bool
    created_at: str
    updated_at: str
    started_at: str | None
    finished_at: str | None
    expires_at: str | None
    deduplicated: bool
    deduplicated_from: str | None
    events_url: str
    input: Any = None
    parameters: dict[str, Any] | None = None


class DeadLetterPage(BaseModel):
    """``GET /v1/admin/requests``: requests of every user in the statuses asked for."""

    requests: list[RequestDoc]
    next_cursor: str | None
    limit: int


class RequeueBody(BaseModel):
    """Optional body of ``POST /v1/admin/requests/{id}/requeue``."""

    model_config = ConfigDict(extra="forbid")

    attempts: int | None = Field(default=None, ge=1, le=100)
    """Attempts it gets from now on; default: the server's ``max_attempts``."""


# ---------------------------------------------------------------- Open Inference Protocol (V2)
class V2Tensor(BaseModel):
    """One tensor: its elements in ``data`` (flat or nested, row-major), or, with the binary
    tensor extension, ``parameters.binary_data_size`` bytes after the JSON."""

    name: str = Field(examples=["input"])
    shape: list[int] = Field(examples=[[1, 4]])
    datatype: str = Field(examples=["FP64"])
    parameters: dict[str, Any] | None = None
    data: list[Any] | None = Field(default=None, examples=[[5.1, 3.5, 1.4, 0.2]])


class V2RequestedOutput(BaseModel):
    name: str = Field(examples=["probabilities"])
    parameters: dict[str, Any] | None = None
    """``binary_data`` (bool), ``classification`` (top-k classes)."""


class V2InferRequest(BaseModel):
    """``POST /v2/models/{name}/infer``: the model's one input, ``input``."""

    id: str | None = Field(default=None, max_length=128)
    parameters: dict[str, Any] | None = None
    """``binary_data_output`` (bool), ``timeout`` (microseconds)."""
    inputs: list[V2Tensor] = Field(min_length=1)
    outputs: list[V2RequestedOutput] | None = None


class V2InferResponse(BaseModel):
    model_name: str
    model_version: str
    id: str | None = None
    outputs: list[V2Tensor]


class V2ErrorBody(BaseModel):
    """The protocol's error body: what was wrong, in a sentence."""

    error: str


V2_ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": V2ErrorBody, "description": text}
    for code, text in {
        400: "Malformed JSON, tensors that do not fit the model, a bad header",
        404: "Unknown model or version",
        413: "Body or row count over the limit",
        415: "Content-Encoding other than gzip, deflate or identity",
        429: "Rate limit or daily token budget exhausted; see Retry-After",
        500: "The model failed on the batch this request was in",
        503: "Overloaded (shed) or model not ready; see Retry-After",
        504: "Deadline passed before the model answered",
    }.items()
}
"""The statuses of V2 ``infer``; a body that is read but invalid is the protocol's 400."""
