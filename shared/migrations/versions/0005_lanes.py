"""Lanes and pause: every job has a lane, a batch can be paused, a tenant can be held to some lanes.

The dispatcher reads a batch's undispatched jobs of one lane in FIFO order, so the
(batch_id, status) index grows to (batch_id, status, lane, queued_at, line): the same prefix
for the queries that used it, and an ordered walk for the dispatcher.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add `jobs.lane`, `batches.paused`, `tenants.lanes`; widen the batch index."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("lane", sa.String(16), server_default="bulk", nullable=False))
    op.drop_index("ix_jobs_batch_id_status", table_name="jobs")
    op.create_index(
        "ix_jobs_batch_id_status_lane_queued_at_line", "jobs", ["batch_id", "status", "lane", "queued_at", "line"]
    )
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("paused", sa.Boolean(), server_default=sa.false(), nullable=False))
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("lanes", sa.String(100), nullable=True))


def downgrade() -> None:
    """Drop them again."""
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("lanes")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("paused")
    op.drop_index("ix_jobs_batch_id_status_lane_queued_at_line", table_name="jobs")
    op.create_index("ix_jobs_batch_id_status", "jobs", ["batch_id", "status"])
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("lane")
