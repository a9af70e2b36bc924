"""pydantic models that document the JSON bodies in the OpenAPI schema (``/docs``, ``/redoc``).

The hot path validates by hand (see :mod:`inferd.codec`) to the same rules.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

__all__ = [
    "ErrorBody",
    "ModelPredictRequest",
    "ModelPredictResponse",
    "PredictRequest",
    "PredictResponse",
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
