"""API keys: only a hash of each key is stored.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Create inferd_api_keys."""
    op.create_table(
        "inferd_api_keys",
        sa.Column("id", sa.String(32), nullable=False),
        sa.Column("user_id", sa.String(255), nullable=False),
        sa.Column("name", sa.String(255), nullable=True),
        sa.Column("scopes", sa.String(255), nullable=False),
        sa.Column("rate", sa.String(32), nullable=True),
        sa.Column("daily_tokens", sa.BigInteger(), nullable=True),
        sa.Column("secret_hash", sa.String(64), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("revoked_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_inferd_api_keys")),
    )
    op.create_index(op.f("ix_inferd_api_keys_user_id"), "inferd_api_keys", ["user_id"])


def downgrade() -> None:
    """Drop inferd_api_keys (every key stops working)."""
    op.drop_index(op.f("ix_inferd_api_keys_user_id"), table_name="inferd_api_keys")
    op.drop_table("inferd_api_keys")
