"""Stored values of long-running requests: times, body hashes, rows to records and events."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

import orjson

from inferd.errors import BadRequest
from inferd.jobs.types import Event, EventKind, RequestRecord, RequestStatus

__all__ = ["Started", "body_hash", "iso", "json_text", "to_datetime", "to_event", "to_record"]

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


class Started(NamedTuple):
    """A request that a claim started (on either database), as its lease is made from."""

    id: str
    last_seq: int
    attempts: int
    model: str
    input: Any
    parameters: Any
    trace_context: Any
    charged: bool


def to_datetime(us: int) -> datetime:
    """A stored time (microseconds since the epoch) as a tz-aware UTC datetime."""
    return _EPOCH + timedelta(microseconds=us)


def iso(us: int) -> str:
    """A stored time as ISO-8601 text in UTC (``2025-01-31T12:00:00.000000Z``)."""
    return to_datetime(us).isoformat(timespec="microseconds").replace("+00:00", "Z")


def json_text(value: Any) -> str:
    """``value`` as JSON text for a ``json`` column, by orjson (a tenth of the standard
    library's time on the hot path). Non-string keys become strings, as with ``json.dumps``;
    a NaN or an infinity becomes ``null`` (``json.dumps`` wrote a token that PostgreSQL
    refuses); what orjson does not take (an integer past 64 bits) goes through ``json``."""
    try:
        return orjson.dumps(value, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        return json.dumps(value)


def body_hash(model: str, version: str | None, input: Any, parameters: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of a request body (sorted keys, no spaces)."""
    try:
        canonical = json.dumps(
            {"model": model, "version": version, "input": input, "parameters": parameters},
            sort_keys=True,
            separators=(",", ":"),
            ensure_ascii=False,
            allow_nan=False,
        )
    except (TypeError, ValueError) as exc:
        raise BadRequest(f"input and parameters must be plain JSON values: {exc}") from None
    return hashlib.sha256(canonical.encode()).hexdigest()


def to_record(row: Mapping[Any, Any], responses: list[dict[str, Any]]) -> RequestRecord:
    """The record of a stored ``inferd_requests`` row (a row's ``_mapping``)."""
    started, finished = row["started_at"], row["finished_at"]
    expires = row.get("expires_at")
    return RequestRecord(
        id=row["id"],
        user=row["user_id"],
        model=row["model"],
        version=row["version"],
        input=row["input"],
        parameters=row["parameters"],
        status=RequestStatus(row["status"]),
        attempts=row["attempts"],
        max_attempts=row["max_attempts"],
        result=row["result"],
        error=row["error"],
        created_at=to_datetime(row["created_at"]),
        updated_at=to_datetime(row["updated_at"]),
        started_at=None if started is None else to_datetime(started),
        finished_at=None if finished is None else to_datetime(finished),
        cancel_requested=bool(row["cancel_requested"]),
        idempotency_key=row["idempotency_key"],
        last_seq=row["last_seq"],
        responses=responses,
        expires_at=None if expires is None else to_datetime(expires),
        deduplicated_from=row.get("dedup_of"),
    )


def to_event(row: Mapping[Any, Any]) -> Event:
    """The event of a stored ``inferd_events`` row (a row's ``_mapping``)."""
    return Event(
        request_id=row["request_id"],
        seq=row["seq"],
        kind=EventKind(row["kind"]),
        data=row["data"],
        attempt=row["attempt"],
        created_at=to_datetime(row["created_at"]),
    )
