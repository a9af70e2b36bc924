"""The database of inferd: every table, shared by SQLite and PostgreSQL.

Long-running requests (:mod:`inferd.jobs`):

* ``inferd_requests``: one row per accepted request, its status and result. ``last_seq`` is
  the seq of its newest event: it is incremented in the same transaction as each event
  insert, which is what keeps ``seq`` gap-free per request.
* ``inferd_jobs``: the queue. A row exists exactly while its request is ``queued`` or
  ``running``; it is deleted when the request reaches a terminal status, so the queue scans
  stay small however many finished requests are kept.
* ``inferd_events``: the event log of each request, keyed by (request_id, seq).

Queue controls (revision 0004): a request may carry ``expires_at`` (the last instant an
attempt may start; a queued job past it ends ``expired``), a ``dedup_hash`` (models with
``[jobs] dedup``) and ``dedup_of`` (the request whose run it joined or whose result it
reused). A job also carries a copy of ``expires_at`` and the API key that submitted it
(``key_id``), which the per-key bound of queued requests counts.

Tenancy (:mod:`inferd.tenancy`): ``inferd_api_keys``, ``inferd_usage`` (per key, model and UTC
day) and ``inferd_request_charges`` (the budget a long-running request reserved).

Times are integers of microseconds since the epoch (UTC): they compare exactly and the same
way on both databases, which floats and time zones would not guarantee.

The tables carry an ``inferd_`` prefix (and the migration history its own version table) so
that they can live in a PostgreSQL database shared with other applications. A change here
needs a new migration in ``inferd/db/migrations/versions``; a test checks that they agree.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    Column,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Table,
    Text,
    UniqueConstraint,
    text,
)

__all__ = [
    "VERSION_TABLE",
    "api_keys",
    "charges",
    "events",
    "jobs",
    "metadata",
    "requests",
    "usage",
]

VERSION_TABLE = "inferd_alembic_version"
"""Alembic's version table for these tables (not the default name, which an application
sharing the database may use for its own migrations)."""

# Constraint names must be deterministic for migrations to be able to refer to them.
metadata = MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "ck": "ck_%(table_name)s_%(constraint_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)


def _where_set(column: str) -> dict[str, Any]:
    """An index's options that keep only the rows where ``column`` is not NULL."""
    where = text(f"{column} IS NOT NULL")
    return {"postgresql_where": where, "sqlite_where": where}


requests = Table(
    "inferd_requests",
    metadata,
    Column("id", String(40), primary_key=True),
    Column("user_id", String(255), nullable=False),
    Column("model", String(255), nullable=False),
    Column("version", String(255), nullable=True),
    # Any JSON value, null included (stored as JSON null, not SQL NULL).
    Column("input", JSON, nullable=True),
    Column("parameters", JSON, nullable=False),
    # sha256 of the canonical JSON of (model, version, input, parameters): what an
    # idempotent retry must match.
    Column("body_hash", String(64), nullable=False),
    Column("idempotency_key", String(255), nullable=True),
    Column("status", String(16), nullable=False),
    Column("attempts", Integer, nullable=False),
    Column("max_attempts", Integer, nullable=False),
    Column("result", JSON, nullable=True),
    Column("error", Text, nullable=True),
    Column("cancel_requested", Boolean, nullable=False),
    Column("last_seq", Integer, nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("updated_at", BigInteger, nullable=False),
    Column("started_at", BigInteger, nullable=True),
    Column("finished_at", BigInteger, nullable=True),
    # W3C trace context of the submit (traceparent, tracestate) while tracing is on, else NULL:
    # the worker's span of each run is its child.
    Column("trace_context", JSON, nullable=True),
    # The last instant an attempt may start (TTL); NULL: never expires.
    Column("expires_at", BigInteger, nullable=True),
    # sha256 of (model, version, input, parameters) for models with [jobs] dedup; else NULL.
    Column("dedup_hash", String(64), nullable=True),
    # The request whose run this one joined, or whose stored result answered it.
    Column("dedup_of", String(40), nullable=True),
    # NULL keys are distinct on both databases: requests without a key never collide.
    UniqueConstraint("user_id", "idempotency_key"),
    CheckConstraint(
        "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'dead', 'expired')",
        name="status",
    ),
    # Keyset pagination of one user's requests, newest first.
    Index(None, "user_id", "created_at", "id"),
    Index(None, "status"),
    # The next three hold only the rows with a value (migration 0007): most rows have none,
    # and every lookup compares the column with a value.
    # Deduplication: the newest succeeded (or running) request with the same body.
    Index(None, "dedup_hash", **_where_set("dedup_hash")),
    # Retention: terminal requests by age, oldest first.
    Index(None, "finished_at", **_where_set("finished_at")),
    # Joined requests of a running one.
    Index(None, "dedup_of", **_where_set("dedup_of")),
)

jobs = Table(
    "inferd_jobs",
    metadata,
    Column(
        "request_id",
        String(40),
        ForeignKey(requests.c.id, ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("model", String(255), nullable=False),
    Column("state", String(16), nullable=False),
    Column("run_at", BigInteger, nullable=False),
    Column("lease_token", String(64), nullable=True),
    Column("lease_expires_at", BigInteger, nullable=True),
    Column("worker_id", String(255), nullable=True),
    # The request's expires_at (copied: the expiry sweep reads this table only).
    Column("expires_at", BigInteger, nullable=True),
    # The API key that submitted the request (the per-key bound of queued requests).
    Column("key_id", String(32), nullable=True),
    CheckConstraint("state IN ('queued', 'running')", name="state"),
    # claim: the oldest due queued job; reap: running jobs by lease expiry.
    Index(None, "state", "run_at", "request_id"),
    Index(None, "state", "lease_expires_at"),
    # The bounded queue: queued jobs per model and per key; the expiry sweep (the last two
    # of the jobs that have a key, an expiry).
    Index(None, "model", "state"),
    Index(None, "key_id", "state", **_where_set("key_id")),
    Index(None, "state", "expires_at", **_where_set("expires_at")),
)

events = Table(
    "inferd_events",
    metadata,
    Column(
        "request_id",
        String(40),
        ForeignKey(requests.c.id, ondelete="CASCADE"),
        primary_key=True,
    ),
    Column("seq", Integer, primary_key=True),
    Column("kind", String(16), nullable=False),
    Column("attempt", Integer, nullable=False),
    Column("data", JSON, nullable=False),
    Column("created_at", BigInteger, nullable=False),
)


# API keys (see inferd.tenancy.keys): only a SHA-256 of each key is stored.
api_keys = Table(
    "inferd_api_keys",
    metadata,
    Column("id", String(32), primary_key=True),
    Column("user_id", String(255), nullable=False, index=True),
    Column("name", String(255), nullable=True),
    Column("scopes", String(255), nullable=False),
    Column("rate", String(32), nullable=True),
    Column("daily_tokens", BigInteger, nullable=True),
    Column("priority", String(8), nullable=True),
    Column("secret_hash", String(64), nullable=False),
    Column("created_at", BigInteger, nullable=False),
    Column("revoked_at", BigInteger, nullable=True),
)

# Usage per key, model and UTC day: what the daily budgets charged, kept for billing.
usage = Table(
    "inferd_usage",
    metadata,
    Column("key_id", String(32), primary_key=True),
    Column("model", String(255), primary_key=True),
    Column("day", String(10), primary_key=True),
    Column("user_id", String(255), nullable=False),
    Column("requests", BigInteger, nullable=False),
    Column("tokens", BigInteger, nullable=False),
)

# Budget reserved by a long-running request, settled when it ends.
charges = Table(
    "inferd_request_charges",
    metadata,
    Column("request_id", String(40), primary_key=True),
    Column("key_id", String(32), nullable=False),
    Column("user_id", String(255), nullable=False),
    Column("day", String(10), nullable=False),
    Column("reserved", BigInteger, nullable=False),
)
