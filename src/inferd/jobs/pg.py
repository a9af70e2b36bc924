"""The worker's hot statements on PostgreSQL, one round trip each.

A worker claims jobs and stores their chunks and completions many times a second. Written as
separate statements inside BEGIN ... COMMIT (as they are for SQLite, in
:mod:`inferd.jobs.sql`), a claim took six round trips to the database and a group write seven
or eight: on an idle machine most of the 3.5-5.5 ms a streamed chunk spent before it could be
published, and under load a large share of the worker's CPU and of the database's (each round
trip is a send, a wake-up and a receive on both sides). Here each is one statement with
data-modifying ``WITH`` clauses, run outside an explicit transaction: a single statement is
atomic by itself.

Create (:func:`create`), the API's group commit of new requests:

* the requests, their jobs, their first ``status`` events and their budget charges are
  inserted from arrays (one element per request), after the bounds of the queues they join are
  counted in the same statement (``refused``): if one would be exceeded nothing is inserted
  and the caller stores the requests one at a time, each getting its own answer (as with
  separate statements, concurrent submits on PostgreSQL may overshoot a bound by the number
  of them in flight: no lock is taken for the count). A group with no bound to count and
  nothing to charge (no queue bound set, no daily budget) takes the same inserts without
  those parts, a quarter less of the server's CPU for four requests.

Claim (:func:`claim`):

* ``chosen`` locks the oldest due queued jobs, skipping rows other claimers hold
  (``FOR UPDATE SKIP LOCKED``); ``taken`` gives them the lease; ``started`` marks their
  requests ``running`` with one more attempt and takes their next seq; ``stored`` inserts the
  ``status`` events. The statement also says whether some running job's lease has expired
  (``overdue``): the caller then reaps (a transaction of its own, rare) and claims again,
  instead of looking for expired leases in a separate statement before every claim.

Group write (:func:`group_write`):

* ``gone`` deletes the jobs of the leases that finish, ``kept`` locks the jobs of the others
  (``FOR UPDATE``): both only where the lease is still the job's (same token, ``running``,
  not expired at ``now``), the fence of every worker write. Under READ COMMITTED a row that
  another transaction changed while this one waited for its lock is checked again on its
  newest version, so a lease taken back by the reaper or another worker is not written.
* ``bumped`` advances each held request's ``last_seq`` by its number of new events (and ends
  the finishing ones as ``succeeded``). An UPDATE computes on the newest version of the row
  once it holds the lock, so the seqs follow whatever a cancel committed meanwhile, as the
  separate read of the statement version did.
* ``stored`` inserts the events at ``base + 1 ...`` where ``base`` is the request's
  ``last_seq`` before the bump; the statement returns ``(id, base, attempts)`` per held lease,
  from which the caller builds the same events without reading them back.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, NamedTuple

import asyncpg
from sqlalchemy import text

from inferd.db.hot import HotStatement
from inferd.db.schema import charges, events, jobs, requests
from inferd.jobs.rows import Started, iso, json_text, to_datetime
from inferd.jobs.types import Event, EventKind, JobWrite, RequestStatus

__all__ = ["Claimed", "claim", "create", "extend", "group_write"]

_STATEMENT = text(
    f"""
WITH w AS MATERIALIZED (
    SELECT * FROM unnest(
        CAST(:ids AS text[]), CAST(:tokens AS text[]), CAST(:counts AS integer[]),
        CAST(:done AS boolean[]), CAST(:results AS text[])
    ) AS w(id, token, n, done, result)
),
gone AS (
    DELETE FROM {jobs.name} AS j USING w
    WHERE w.done AND j.request_id = w.id AND j.lease_token = w.token
      AND j.state = 'running' AND j.lease_expires_at > :now
    RETURNING j.request_id
),
kept AS (
    SELECT j.request_id FROM {jobs.name} AS j JOIN w ON j.request_id = w.id
    WHERE NOT w.done AND j.lease_token = w.token
      AND j.state = 'running' AND j.lease_expires_at > :now
    FOR UPDATE OF j
),
bumped AS (
    UPDATE {requests.name} AS r SET
        last_seq = r.last_seq + w.n,
        updated_at = :now,
        status = CASE WHEN w.done THEN 'succeeded' ELSE r.status END,
        result = CASE WHEN w.done THEN CAST(w.result AS json) ELSE r.result END,
        error = CASE WHEN w.done THEN NULL ELSE r.error END,
        finished_at = CASE WHEN w.done THEN :now ELSE r.finished_at END
    FROM w
    WHERE r.id = w.id
      AND r.id IN (SELECT request_id FROM gone UNION ALL SELECT request_id FROM kept)
    RETURNING r.id, r.last_seq - w.n AS base, r.attempts
),
stored AS (
    INSERT INTO {events.name} (request_id, seq, kind, attempt, data, created_at)
    SELECT b.id, b.base + e.off, e.kind, b.attempts, CAST(e.data AS json), :now
    FROM unnest(
        CAST(:e_ids AS text[]), CAST(:e_offs AS integer[]), CAST(:e_kinds AS text[]),
        CAST(:e_data AS text[])
    ) AS e(id, off, kind, data)
    JOIN bumped AS b ON b.id = e.id
)
SELECT id, base, attempts FROM bumped
"""
)

# The new requests, from one array per column (one element per request).
_NEW_ROWS = """
    SELECT n.* FROM unnest(
        CAST(:ids AS text[]), CAST(:users AS text[]), CAST(:models AS text[]),
        CAST(:versions AS text[]), CAST(:inputs AS text[]), CAST(:parameters AS text[]),
        CAST(:hashes AS text[]), CAST(:max_attempts AS integer[]), CAST(:traces AS text[]),
        CAST(:expires AS bigint[]), CAST(:key_ids AS text[])
    ) AS n(id, user_id, model, version, input, parameters, body_hash, max_attempts,
           trace_context, expires_at, key_id)
""".strip("\n")

# Their rows in the requests, jobs and events tables (from ``new``).
_STORE_NEW = f"""
stored_requests AS (
    INSERT INTO {requests.name} (
        id, user_id, model, version, input, parameters, body_hash, idempotency_key, status,
        attempts, max_attempts, result, error, cancel_requested, last_seq, created_at,
        updated_at, started_at, finished_at, trace_context, expires_at, dedup_hash, dedup_of
    )
    SELECT id, user_id, model, version, CAST(input AS json), CAST(parameters AS json),
        body_hash, NULL, 'queued', 0, max_attempts, NULL, NULL, false, 1, :now, :now, NULL, NULL,
        CAST(trace_context AS json), expires_at, NULL, NULL
    FROM new
),
stored_jobs AS (
    INSERT INTO {jobs.name} (request_id, model, state, run_at, expires_at, key_id)
    SELECT id, model, 'queued', :now, expires_at, key_id FROM new
),
stored_events AS (
    INSERT INTO {events.name} (request_id, seq, kind, attempt, data, created_at)
    SELECT id, 1, 'status', 0, CAST(:first AS json), :now FROM new
)
""".strip("\n")

_CREATE = text(
    f"""
WITH refused AS (
    SELECT 1 FROM unnest(
        CAST(:mb_models AS text[]), CAST(:mb_bounds AS integer[]), CAST(:mb_adding AS integer[])
    ) AS b(model, bound, adding)
    WHERE b.adding + (
        SELECT count(*) FROM (
            SELECT 1 FROM {jobs.name} AS j WHERE j.model = b.model AND j.state = 'queued'
            LIMIT b.bound
        ) AS q
    ) > b.bound
    UNION ALL
    SELECT 1 FROM unnest(
        CAST(:kb_keys AS text[]), CAST(:kb_bounds AS integer[]), CAST(:kb_adding AS integer[])
    ) AS b(key_id, bound, adding)
    WHERE b.adding + (
        SELECT count(*) FROM (
            SELECT 1 FROM {jobs.name} AS j WHERE j.key_id = b.key_id AND j.state = 'queued'
            LIMIT b.bound
        ) AS q
    ) > b.bound
),
admitted AS (
    SELECT NOT EXISTS (SELECT 1 FROM refused) AS ok
),
new AS MATERIALIZED (
{_NEW_ROWS}
    WHERE (SELECT ok FROM admitted)
),
{_STORE_NEW},
stored_charges AS (
    INSERT INTO {charges.name} (request_id, key_id, user_id, day, reserved)
    SELECT c.* FROM unnest(
        CAST(:c_ids AS text[]), CAST(:c_keys AS text[]), CAST(:c_users AS text[]),
        CAST(:c_days AS text[]), CAST(:c_reserved AS bigint[])
    ) AS c(request_id, key_id, user_id, day, reserved)
    WHERE (SELECT ok FROM admitted)
)
SELECT ok FROM admitted
"""
)

# The same without the bounds and the charges, where the batch has neither (no queue bound
# is set and no key has a daily budget): a quarter less of the server's CPU for four rows.
_CREATE_PLAIN = text(
    f"""
WITH new AS MATERIALIZED (
{_NEW_ROWS}
),
{_STORE_NEW}
SELECT true AS ok
"""
)

_CLAIM = text(
    f"""
WITH chosen AS (
    SELECT request_id FROM {jobs.name}
    WHERE state = 'queued' AND run_at <= :now AND (expires_at IS NULL OR expires_at > :now)
      AND (CAST(:models AS text[]) IS NULL OR model = ANY(CAST(:models AS text[])))
    ORDER BY run_at, request_id
    LIMIT :limit
    FOR UPDATE SKIP LOCKED
),
taken AS (
    UPDATE {jobs.name} AS j SET
        state = 'running', lease_token = :token, lease_expires_at = :expires, worker_id = :worker
    WHERE j.request_id = ANY(ARRAY(SELECT request_id FROM chosen))
    RETURNING j.request_id
),
started AS (
    UPDATE {requests.name} AS r SET
        status = 'running',
        attempts = r.attempts + 1,
        started_at = coalesce(r.started_at, :now),
        updated_at = :now,
        last_seq = r.last_seq + 1
    WHERE r.id = ANY(ARRAY(SELECT request_id FROM taken))
    RETURNING r.id, r.last_seq, r.attempts, r.model, r.input, r.parameters, r.trace_context,
        EXISTS (SELECT 1 FROM {charges.name} AS c WHERE c.request_id = r.id) AS charged
),
stored AS (
    INSERT INTO {events.name} (request_id, seq, kind, attempt, data, created_at)
    SELECT id, last_seq, 'status', attempts,
        json_build_object('status', 'running', 'attempt', attempts), :now
    FROM started
)
SELECT started.*, overdue.expired AS overdue
FROM (
    SELECT EXISTS (
        SELECT 1 FROM {jobs.name} WHERE state = 'running' AND lease_expires_at <= :now
    ) AS expired
) AS overdue
LEFT JOIN started ON true
ORDER BY started.id
"""
)

_EXTEND = text(
    f"""
UPDATE {jobs.name} SET lease_expires_at = :expires
WHERE request_id = ANY(CAST(:ids AS text[])) AND lease_token = :token
"""
)

# Run on asyncpg directly (inferd.db.hot); the texts above stay what the plan tests prepare.
_HOT_CREATE, _HOT_CREATE_PLAIN, _HOT_CLAIM, _HOT_EXTEND, _HOT_WRITE = (
    HotStatement(_CREATE), HotStatement(_CREATE_PLAIN), HotStatement(_CLAIM),
    HotStatement(_EXTEND), HotStatement(_STATEMENT),
)  # fmt: skip

_SUCCEEDED = RequestStatus.SUCCEEDED.value
_QUEUED = RequestStatus.QUEUED.value
_FIRST = json_text({"status": _QUEUED, "attempt": 0})  # a new request's first event
_RESPONSE = EventKind.RESPONSE
_DONE = EventKind.DONE


async def group_write(
    conn: asyncpg.Connection, writes: Sequence[JobWrite], now: int
) -> list[list[Event] | None]:
    """Apply ``writes`` (at most one per lease) at ``now`` (µs) in one statement on ``conn``,
    which must not be inside a transaction of its own; the events stored for each write, or
    None where its lease was no longer valid. Same effects as the SQLite group write
    (:meth:`inferd.jobs.lite.LiteWriter.write`)."""
    sent_at = iso(now)
    planned: list[list[tuple[EventKind, dict[str, Any]]]] = []
    e_ids: list[str] = []
    e_offs: list[int] = []
    e_kinds: list[str] = []
    e_data: list[str] = []
    counts: list[int] = []
    results: list[str | None] = []
    for w in writes:
        rid = w.lease.request_id
        kinds: list[tuple[EventKind, dict[str, Any]]] = [
            (_RESPONSE, {"sent_at": sent_at} | data) for data in w.responses
        ]
        if w.done:
            kinds.append((_DONE, {"status": _SUCCEEDED, "result": w.result}))
            results.append(json_text(w.result))
        else:
            results.append(None)
        for off, (kind, data) in enumerate(kinds, start=1):
            e_ids.append(rid)
            e_offs.append(off)
            e_kinds.append(kind.value)
            e_data.append(json_text(data))
        counts.append(len(kinds))
        planned.append(kinds)
    params = {
        "ids": [w.lease.request_id for w in writes],
        "tokens": [w.lease.token for w in writes],
        "counts": counts,
        "done": [w.done for w in writes],
        "results": results,
        "e_ids": e_ids,
        "e_offs": e_offs,
        "e_kinds": e_kinds,
        "e_data": e_data,
        "now": now,
    }
    held = {row[0]: (row[1], row[2]) for row in await _HOT_WRITE.fetch(conn, params)}
    created_at = to_datetime(now)
    out: list[list[Event] | None] = []
    for w, kinds in zip(writes, planned, strict=True):
        rid = w.lease.request_id
        if rid not in held:
            out.append(None)
            continue
        base, attempt = held[rid]
        out.append(
            [
                Event(
                    request_id=rid,
                    seq=base + off,
                    kind=kind,
                    data=data,
                    attempt=attempt,
                    created_at=created_at,
                )
                for off, (kind, data) in enumerate(kinds, start=1)
            ]
        )
    return out


class Claimed(NamedTuple):
    """What one claim statement did: the requests it started (by id) and whether some
    running job's lease had expired."""

    rows: list[Started]
    overdue: bool


async def claim(
    conn: asyncpg.Connection,
    *,
    worker_id: str,
    token: str,
    now: int,
    expires: int,
    limit: int,
    models: list[str] | None,
) -> Claimed:
    """Take up to ``limit`` of the oldest due jobs (of ``models`` if given) at ``now`` (µs)
    with a lease of ``token`` until ``expires``, in one statement on ``conn`` (not inside a
    transaction of its own)."""
    params = {
        "now": now,
        "expires": expires,
        "token": token,
        "worker": worker_id,
        "limit": limit,
        "models": models,
    }
    result = await _HOT_CLAIM.fetch(conn, params)
    started = [
        Started(
            row["id"],
            row["last_seq"],
            row["attempts"],
            row["model"],
            _json(row["input"]),
            _json(row["parameters"]),
            _json(row["trace_context"]),
            bool(row["charged"]),
        )
        for row in result
        if row["id"] is not None
    ]
    return Claimed(started, bool(result[0]["overdue"]))


def _json(value: str | None) -> Any:
    """A ``json`` column's value (asyncpg gives the text)."""
    return None if value is None else json.loads(value)


async def extend(conn: asyncpg.Connection, ids: list[str], token: str, expires: int) -> None:
    """Move the lease of the jobs ``ids`` held under ``token`` to ``expires`` (µs)."""
    await _HOT_EXTEND.fetch(conn, {"ids": ids, "token": token, "expires": expires})


async def create(
    conn: asyncpg.Connection,
    rows: Sequence[dict[str, Any]],
    charged: Sequence[dict[str, Any]],
    *,
    key_ids: Sequence[str | None],
    model_bounds: Sequence[tuple[str, int, int]],
    key_bounds: Sequence[tuple[str, int, int]],
    now: int,
) -> bool:
    """Insert new requests (``rows``: the fields of ``inferd_requests`` that a new request
    without idempotency key or deduplication has, ``id`` and ``expires_at`` set), their jobs
    (submitted with ``key_ids``), their first events and ``charged`` (rows of
    ``inferd_request_charges``) at ``now`` (µs), in one statement on ``conn`` (not inside a
    transaction of its own), unless a bound is reached: ``model_bounds`` and ``key_bounds``
    are (model or key, bound, requests added to it). True if stored, False if refused."""
    params = {
        "first": _FIRST,
        "now": now,
        "mb_models": [model for model, _, _ in model_bounds],
        "mb_bounds": [bound for _, bound, _ in model_bounds],
        "mb_adding": [adding for _, _, adding in model_bounds],
        "kb_keys": [key for key, _, _ in key_bounds],
        "kb_bounds": [bound for _, bound, _ in key_bounds],
        "kb_adding": [adding for _, _, adding in key_bounds],
        "ids": [row["id"] for row in rows],
        "users": [row["user_id"] for row in rows],
        "models": [row["model"] for row in rows],
        "versions": [row["version"] for row in rows],
        "inputs": [json_text(row["input"]) for row in rows],
        "parameters": [json_text(row["parameters"]) for row in rows],
        "hashes": [row["body_hash"] for row in rows],
        "max_attempts": [row["max_attempts"] for row in rows],
        "traces": [json_text(row["trace_context"]) for row in rows],
        "expires": [row["expires_at"] for row in rows],
        "key_ids": list(key_ids),
        "c_ids": [c["request_id"] for c in charged],
        "c_keys": [c["key_id"] for c in charged],
        "c_users": [c["user_id"] for c in charged],
        "c_days": [c["day"] for c in charged],
        "c_reserved": [c["reserved"] for c in charged],
    }
    if not (model_bounds or key_bounds or charged):
        await _HOT_CREATE_PLAIN.fetch(conn, params)  # nothing to count, nothing charged
        return True
    return bool((await _HOT_CREATE.fetch(conn, params))[0][0])
