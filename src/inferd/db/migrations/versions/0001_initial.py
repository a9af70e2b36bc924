"""The tables of long-running requests: requests, jobs, events.

Revision ID: 0001
Revises:
Create Date: 2025-01-01

A migration is frozen history: it spells the tables out instead of importing
``inferd.db.schema``, which will keep changing after this revision. Names are final
(``op.f``): the naming convention of the current metadata must not rewrite them.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0001"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create the three tables and their indexes."""
    op.create_table(
        "inferd_requests",
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
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inferd_requests")),
        sa.UniqueConstraint(
            "user_id", "idempotency_key", name=op.f("uq_inferd_requests_user_id_idempotency_key")
        ),
        sa.CheckConstraint(
            "status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled', 'dead')",
            name=op.f("ck_inferd_requests_status"),
        ),
    )
    op.create_index(
        op.f("ix_inferd_requests_user_id_created_at_id"),
        "inferd_requests",
        ["user_id", "created_at", "id"],
    )
    op.create_index(op.f("ix_inferd_requests_status"), "inferd_requests", ["status"])

    op.create_table(
        "inferd_jobs",
        sa.Column("request_id", sa.String(40), nullable=False),
        sa.Column("model", sa.String(255), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("run_at", sa.BigInteger(), nullable=False),
        sa.Column("lease_token", sa.String(64), nullable=True),
        sa.Column("lease_expires_at", sa.BigInteger(), nullable=True),
        sa.Column("worker_id", sa.String(255), nullable=True),
        sa.PrimaryKeyConstraint("request_id", name=op.f("pk_inferd_jobs")),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["inferd_requests.id"],
            name=op.f("fk_inferd_jobs_request_id_inferd_requests"),
            ondelete="CASCADE",
        ),
        sa.CheckConstraint("state IN ('queued', 'running')", name=op.f("ck_inferd_jobs_state")),
    )
    op.create_index(
        op.f("ix_inferd_jobs_state_run_at_request_id"),
        "inferd_jobs",
        ["state", "run_at", "request_id"],
    )
    op.create_index(
        op.f("ix_inferd_jobs_state_lease_expires_at"), "inferd_jobs", ["state", "lease_expires_at"]
    )

    op.create_table(
        "inferd_events",
        sa.Column("request_id", sa.String(40), nullable=False),
        sa.Column("seq", sa.Integer(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("attempt", sa.Integer(), nullable=False),
        sa.Column("data", sa.JSON(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("request_id", "seq", name=op.f("pk_inferd_events")),
        sa.ForeignKeyConstraint(
            ["request_id"],
            ["inferd_requests.id"],
            name=op.f("fk_inferd_events_request_id_inferd_requests"),
            ondelete="CASCADE",
        ),
    )


def downgrade() -> None:
    """Drop the tables (and with them every stored request)."""
    op.drop_table("inferd_events")
    op.drop_table("inferd_jobs")
    op.drop_index(op.f("ix_inferd_requests_status"), table_name="inferd_requests")
    op.drop_index(op.f("ix_inferd_requests_user_id_created_at_id"), table_name="inferd_requests")
    op.drop_table("inferd_requests")
