"""The trace context a long-running request was submitted under.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add inferd_requests.trace_context (NULL: not traced)."""
    with op.batch_alter_table("inferd_requests") as batch:
        batch.add_column(sa.Column("trace_context", sa.JSON(), nullable=True))


def downgrade() -> None:
    """Drop inferd_requests.trace_context."""
    with op.batch_alter_table("inferd_requests") as batch:
        batch.drop_column("trace_context")
