"""The priority of an API key's requests.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add inferd_api_keys.priority (NULL: normal)."""
    with op.batch_alter_table("inferd_api_keys") as batch:
        batch.add_column(sa.Column("priority", sa.String(8), nullable=True))


def downgrade() -> None:
    """Drop inferd_api_keys.priority."""
    with op.batch_alter_table("inferd_api_keys") as batch:
        batch.drop_column("priority")
