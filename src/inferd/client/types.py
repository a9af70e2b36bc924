"""What the client returns: plain dataclasses built from the server's JSON.

Each keeps the fields the server documents; fields a newer server adds are not lost, they
stay in ``raw`` (where a result has one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, ClassVar

import numpy as np

__all__ = [
    "ClassScore",
    "Classification",
    "DoneEvent",
    "ErrorEvent",
    "Event",
    "Health",
    "InferResult",
    "ModelInfo",
    "Prediction",
    "RequestInfo",
    "ResponseEvent",
    "StatusEvent",
    "Submitted",
    "UnknownEvent",
    "Usage",
    "event_from_sse",
]

TERMINAL_STATUSES = frozenset({"succeeded", "failed", "cancelled", "dead", "expired"})


def _time(value: Any) -> datetime | None:
    return datetime.fromisoformat(value) if isinstance(value, str) else None


@dataclass(frozen=True, slots=True)
class Prediction:
    """One row's answer: the class (or value), its label, confidence and probabilities."""

    prediction: int | str | float
    confidence: float | None
    model_version: str
    request_id: str | None
    model: str | None = None
    label: str | None = None
    probabilities: list[float] | None = None

    @classmethod
    def from_row(cls, row: dict[str, Any], outer: dict[str, Any]) -> Prediction:
        return cls(
            prediction=row["prediction"],
            confidence=row.get("confidence"),
            model_version=str(outer.get("model_version", "")),
            request_id=outer.get("request_id"),
            model=outer.get("model"),
            label=row.get("label"),
            probabilities=row.get("probabilities"),
        )


@dataclass(frozen=True, slots=True)
class ClassScore:
    """One class of an image classification, best first."""

    label: str
    class_id: int
    probability: float


@dataclass(frozen=True, slots=True)
class Classification:
    """The answer of ``classify``: the ``top_k`` classes, best first."""

    model: str
    version: str
    predictions: list[ClassScore]
    inference_time_ms: float | None
    request_id: str | None = None

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Classification:
        return cls(
            model=doc["model"],
            version=str(doc.get("version", "")),
            predictions=[
                ClassScore(p["label"], int(p["class_id"]), float(p["probability"]))
                for p in doc["predictions"]
            ],
            inference_time_ms=doc.get("inference_time_ms"),
            request_id=doc.get("request_id"),
        )


@dataclass(frozen=True, slots=True)
class InferResult:
    """An Open Inference Protocol (V2) answer; ``result["name"]`` is that output's array."""

    model_name: str
    model_version: str | None
    id: str | None
    outputs: dict[str, np.ndarray]
    parameters: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, name: str) -> np.ndarray:
        return self.outputs[name]


@dataclass(frozen=True, slots=True)
class Submitted:
    """A long-running request the server accepted (``202``)."""

    id: str
    status: str
    created_at: datetime | None
    events_url: str
    replayed: bool
    """True when the idempotency key matched an earlier request: this is that request."""
    idempotency_key: str | None
    expires_at: datetime | None = None
    """When it ends ``expired`` if no worker has started it by then (None: never)."""
    deduplicated_from: str | None = None
    """The identical request that answered it (a stored result, or a run it joined)."""

    @property
    def deduplicated(self) -> bool:
        return self.deduplicated_from is not None

    @classmethod
    def from_json(cls, doc: dict[str, Any], replayed: bool, key: str | None) -> Submitted:
        return cls(
            id=doc["id"],
            status=doc["status"],
            created_at=_time(doc.get("created_at")),
            events_url=doc.get("events_url", f"/v1/requests/{doc['id']}/events"),
            replayed=replayed,
            idempotency_key=key,
            expires_at=_time(doc.get("expires_at")),
            deduplicated_from=doc.get("deduplicated_from"),
        )


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """A stored long-running request: its status, attempts, responses and outcome."""

    id: str
    model: str
    status: str
    user: str | None
    version: str | None
    attempts: int
    max_attempts: int | None
    responses: list[dict[str, Any]]
    """Each stored response as ``{"response": chunk, "sent_at": time}``, in order."""
    result: Any
    error: str | None
    cancel_requested: bool
    created_at: datetime | None
    updated_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    input: Any = None
    parameters: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def terminal(self) -> bool:
        """The request has ended (succeeded, failed, cancelled, dead or expired)."""
        return self.status in TERMINAL_STATUSES

    @property
    def chunks(self) -> list[Any]:
        """The responses' payloads alone."""
        return [r.get("response") for r in self.responses]

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> RequestInfo:
        version = doc.get("version")
        return cls(
            id=doc["id"],
            model=doc["model"],
            status=doc["status"],
            user=doc.get("user"),
            version=None if version is None else str(version),
            attempts=int(doc.get("attempts") or 0),
            max_attempts=doc.get("max_attempts"),
            responses=list(doc.get("responses") or []),
            result=doc.get("result"),
            error=doc.get("error"),
            cancel_requested=bool(doc.get("cancel_requested")),
            created_at=_time(doc.get("created_at")),
            updated_at=_time(doc.get("updated_at")),
            started_at=_time(doc.get("started_at")),
            finished_at=_time(doc.get("finished_at")),
            input=doc.get("input"),
            parameters=doc.get("parameters"),
            raw=doc,
        )


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """A served model: name, version, state and the rest of its metadata in ``raw``."""

    name: str
    version: str | None
    state: str
    ready: bool
    runtime: str | None
    task: str | None
    description: str | None
    versions: list[str]
    raw: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> ModelInfo:
        version = doc.get("version")
        versions = doc.get("versions_available") or doc.get("versions") or []
        return cls(
            name=doc["name"],
            version=None if version is None else str(version),
            state=str(doc.get("state", "")),
            ready=bool(doc.get("ready", doc.get("state") == "ready")),
            runtime=doc.get("runtime"),
            task=doc.get("task"),
            description=doc.get("description"),
            versions=[str(v if not isinstance(v, dict) else v.get("version")) for v in versions],
            raw=doc,
        )


@dataclass(frozen=True, slots=True)
class Health:
    """Readiness: whether every configured model is loaded and warm, and each one's state."""

    ready: bool
    status: str
    models: dict[str, str]
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """The caller's limits and what is left of them today (``auth == "off"``: no key)."""

    user: str
    auth: str
    key_id: str | None
    scopes: list[str]
    rate: str | None
    daily_tokens: int | None
    day: str | None
    tokens_used_today: int | None
    tokens_left_today: int | None
    resets_at: datetime | None
    models: dict[str, Any]

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Usage:
        return cls(
            user=doc.get("user", "anonymous"),
            auth=doc.get("auth", "on"),
            key_id=doc.get("key_id"),
            scopes=list(doc.get("scopes") or []),
            rate=doc.get("rate"),
            daily_tokens=doc.get("daily_tokens"),
            day=doc.get("day"),
            tokens_used_today=doc.get("tokens_used_today"),
            tokens_left_today=doc.get("tokens_left_today"),
            resets_at=_time(doc.get("resets_at")),
            models=dict(doc.get("models") or {}),
        )


# ---------------------------------------------------------------- events of a request


@dataclass(frozen=True, slots=True, kw_only=True)
class Event:
    """One event of a long-running request; ``id`` is what ``Last-Event-ID`` resumes after."""

    kind: ClassVar[str] = ""
    terminal: ClassVar[bool] = False
    id: int | None
    data: dict[str, Any] = field(repr=False)

    @property
    def name(self) -> str:
        """The SSE event name (``status``, ``response``, ``done``, ``error``...)."""
        return self.kind


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusEvent(Event):
    """The request changed status (queued, running, a retry after a failed attempt)."""

    kind: ClassVar[str] = "status"
    status: str
    attempt: int | None
    reason: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class ResponseEvent(Event):
    """A chunk the model produced (a token of text, a batch of predictions)."""

    kind: ClassVar[str] = "response"
    response: Any
    sent_at: datetime | None


@dataclass(frozen=True, slots=True, kw_only=True)
class DoneEvent(Event):
    """The request succeeded; the last event of its stream."""

    kind: ClassVar[str] = "done"
    terminal: ClassVar[bool] = True
    status: str
    result: Any


@dataclass(frozen=True, slots=True, kw_only=True)
class ErrorEvent(Event):
    """The request failed, died or was cancelled; the last event of its stream."""

    kind: ClassVar[str] = "error"
    terminal: ClassVar[bool] = True
    status: str
    error: str | None


@dataclass(frozen=True, slots=True, kw_only=True)
class UnknownEvent(Event):
    """An event this client does not know (from a newer server); passed on as it came."""

    event: str

    @property
    def name(self) -> str:
        return self.event


def event_from_sse(name: str, event_id: int | None, data: Any) -> Event:
    """The typed event of an SSE frame whose data is ``data`` (already JSON-decoded)."""
    doc: dict[str, Any] = data if isinstance(data, dict) else {"value": data}
    if name == "response":
        return ResponseEvent(
            id=event_id, data=doc, response=doc.get("response"), sent_at=_time(doc.get("sent_at"))
        )
    if name == "status":
        return StatusEvent(
            id=event_id,
            data=doc,
            status=str(doc.get("status", "")),
            attempt=doc.get("attempt"),
            reason=doc.get("reason"),
        )
    if name == "done":
        return DoneEvent(
            id=event_id,
            data=doc,
            status=str(doc.get("status", "succeeded")),
            result=doc.get("result"),
        )
    if name == "error":
        error = doc.get("error")
        return ErrorEvent(
            id=event_id,
            data=doc,
            status=str(doc.get("status", "failed")),
            error=error if isinstance(error, str) or error is None else str(error),
        )
    return UnknownEvent(id=event_id, data=doc, event=name)
