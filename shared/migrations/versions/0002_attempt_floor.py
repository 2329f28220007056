"""Jobs remember where their attempt budget starts, so `ipab retry` never resets the fence.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add `jobs.attempt_floor` (0 for existing rows)."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("attempt_floor", sa.Integer(), server_default="0", nullable=False))


def downgrade() -> None:
    """Drop `jobs.attempt_floor`."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("attempt_floor")
