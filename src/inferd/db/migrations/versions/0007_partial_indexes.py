"""Indexes of columns that most rows leave NULL hold only the rows that have a value.

A request without deduplication, retention age or API key has nothing to find in those
indexes, yet each new version of its row (a claim, a completion: both change an indexed
column, so neither is a heap-only update) wrote an entry into each: ~15 of a job's ~40 index
entries, and their WAL, for lookups that never match NULL. Every query that uses these
indexes compares the column with ``=``, ``<`` or ``<=``, which implies ``IS NOT NULL`` to
both PostgreSQL's and SQLite's planners.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | Sequence[str] | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# (table, indexed columns, the column that most rows leave NULL)
_PARTIAL = (
    ("inferd_requests", ["dedup_hash"], "dedup_hash"),
    ("inferd_requests", ["dedup_of"], "dedup_of"),
    ("inferd_requests", ["finished_at"], "finished_at"),
    ("inferd_jobs", ["key_id", "state"], "key_id"),
    ("inferd_jobs", ["state", "expires_at"], "expires_at"),
)


def _name(table: str, columns: list[str]) -> str:
    return op.f(f"ix_{table}_{'_'.join(columns)}")


def upgrade() -> None:
    """Recreate those indexes with ``WHERE <column> IS NOT NULL``."""
    for table, columns, column in _PARTIAL:
        op.drop_index(_name(table, columns), table_name=table)
        where = sa.text(f"{column} IS NOT NULL")
        op.create_index(
            _name(table, columns), table, columns, postgresql_where=where, sqlite_where=where
        )


def downgrade() -> None:
    """Back to indexes of every row."""
    for table, columns, _ in _PARTIAL:
        op.drop_index(_name(table, columns), table_name=table)
        op.create_index(_name(table, columns), table, columns)
