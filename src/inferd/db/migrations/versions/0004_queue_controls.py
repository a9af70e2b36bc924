"""Queue controls: request TTL, deduplication, the per-key bound, retention and ``expired``.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06

New columns: ``inferd_requests.expires_at``, ``dedup_hash``, ``dedup_of``;
``inferd_jobs.expires_at``, ``key_id``; their indexes, and ``expired`` among the statuses.

SQLite cannot change a CHECK constraint in place: ``inferd_requests`` is rebuilt (a copy,
then a rename). :func:`inferd.db.migrate.migrate` turns SQLite's foreign keys off for the
migration's connection, so that dropping the old table does not cascade into the jobs and
events that refer to it; the check below proves that every reference still resolves.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_OLD = "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'dead')"
_NEW = "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'dead', 'expired')"


def _requests(check: str, *added: sa.Column[object]) -> sa.Table:
    """``inferd_requests`` as revision 0003 left it (plus ``added``), with the status check
    ``check``: what SQLite's rebuild copies from (nothing is reflected)."""
    return sa.Table(
        "inferd_requests",
        sa.MetaData(),
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("version", sa.String(255), nullable=True),
        sa.Column("input", sa.JSON(), nullable=True),
        sa.Column("parameters", sa.JSON(), nullable=False),
        sa.Column("body_hash", sa.String(64), nullable=False),
        sa.Column("idempotency_key", sa.String(255), nullable=True),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("max_attempts", sa.Integer(), nullable=False),
        sa.Column("result", sa.JSON(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("cancel_requested", sa.Boolean(), nullable=False),
        sa.Column("last_seq", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("updated_at", sa.BigInteger(), nullable=False),
        sa.Column("started_at", sa.BigInteger(), nullable=True),
        sa.Column("finished_at", sa.BigInteger(), nullable=True),
        *added,
        sa.PrimaryKeyConstraint("id", name="pk_inferd_requests"),
        sa.UniqueConstraint(
            "user_id", "idempotency_key", name="uq_inferd_requests_user_id_idempotency_key"
        ),
        sa.CheckConstraint(check, name="ck_inferd_requests_status"),
        sa.Index("ix_inferd_requests_user_id_created_at_id", "user_id", "created_at", "id"),
        sa.Index("ix_inferd_requests_status", "status"),
    )


def _added() -> list[sa.Column[object]]:
    return [
        sa.Column("expires_at", sa.BigInteger(), nullable=True),
        sa.Column("dedup_hash", sa.String(64), nullable=True),
        sa.Column("dedup_of", sa.String(40), nullable=True),
    ]


def _statuses(old: str, new: str, *, drop_added: bool = False) -> None:
    """Replace the status check ``old`` by ``new`` (and drop the added columns)."""
    if op.get_bind().dialect.name == "sqlite":
        source = _requests(old, *(_added() if drop_added else ()))
        with op.batch_alter_table("inferd_requests", copy_from=source, recreate="always") as batch:
            for column in _added() if drop_added else ():
                batch.drop_column(column.name)
            batch.drop_constraint(op.f("ck_inferd_requests_status"), type_="check")
            batch.create_check_constraint(op.f("ck_inferd_requests_status"), sa.text(new))
        problems = op.get_bind().exec_driver_sql("PRAGMA foreign_key_check").fetchall()
        if problems:
            raise RuntimeError(f"foreign keys broken by the rebuild: {problems[:5]}")
    else:
        op.drop_constraint(op.f("ck_inferd_requests_status"), "inferd_requests", type_="check")
        op.create_check_constraint(
            op.f("ck_inferd_requests_status"), "inferd_requests", sa.text(new)
        )


def upgrade() -> None:
    """Allow ``expired``; add the columns and indexes of the queue controls."""
    _statuses(_OLD, _NEW)
    for column in _added():
        op.add_column("inferd_requests", column)
    for name in ("dedup_hash", "finished_at", "dedup_of"):
        op.create_index(op.f(f"ix_inferd_requests_{name}"), "inferd_requests", [name])
    op.add_column("inferd_jobs", sa.Column("expires_at", sa.BigInteger(), nullable=True))
    op.add_column("inferd_jobs", sa.Column("key_id", sa.String(32), nullable=True))
    for columns in (["model", "state"], ["key_id", "state"], ["state", "expires_at"]):
        op.create_index(op.f(f"ix_inferd_jobs_{'_'.join(columns)}"), "inferd_jobs", columns)


def downgrade() -> None:
    """Drop the new indexes and columns; ``expired`` requests become ``dead``."""
    for columns in (["model", "state"], ["key_id", "state"], ["state", "expires_at"]):
        op.drop_index(op.f(f"ix_inferd_jobs_{'_'.join(columns)}"), table_name="inferd_jobs")
    op.drop_column("inferd_jobs", "key_id")
    op.drop_column("inferd_jobs", "expires_at")
    for name in ("dedup_hash", "finished_at", "dedup_of"):
        op.drop_index(op.f(f"ix_inferd_requests_{name}"), table_name="inferd_requests")
    op.execute("UPDATE inferd_requests SET status = 'dead' WHERE status = 'expired'")
    if op.get_bind().dialect.name != "sqlite":
        for column in _added():
            op.drop_column("inferd_requests", column.name)
    _statuses(_NEW, _OLD, drop_added=True)
