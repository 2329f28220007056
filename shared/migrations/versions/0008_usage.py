"""Usage metering and quotas: what each job used, a rollup per tenant and day, and the quotas.

- `jobs`: `gpu_s` (billed device seconds of the attempt that ended the job), `lost_gpu_s`
  (attempts that did not), `attempt_gpu_s` (the running attempt's, as of its last heartbeat),
  `steps_run`, `pixel_steps`, `queue_s`, `total_s`. NULL (0 for the seconds lost) for jobs
  that ended before: they were not metered.
- `usage_rollup`: usage summed per (tenant, UTC day, batch, lane), with the batch's model set.
  Left empty here: jobs that ended before this revision were not metered.
- `tenant_quotas`: images and GPU-seconds per day and per month, and jobs running at once.
- `quota_refusals`: submissions refused, per tenant and quota.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add the metering columns and the rollup, quota and refusal tables."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("gpu_s", sa.Float(), nullable=True))
        batch.add_column(sa.Column("lost_gpu_s", sa.Float(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("attempt_gpu_s", sa.Float(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("steps_run", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("pixel_steps", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("queue_s", sa.Float(), nullable=True))
        batch.add_column(sa.Column("total_s", sa.Float(), nullable=True))
    op.create_table(
        "usage_rollup",
        sa.Column("tenant", sa.String(100), nullable=False),
        sa.Column("day", sa.Date(), nullable=False),
        sa.Column("batch_id", sa.String(36), nullable=False),
        sa.Column("lane", sa.String(16), nullable=False),
        sa.Column("model_set", sa.String(200), nullable=False),
        sa.Column("jobs", sa.BigInteger(), nullable=False),
        sa.Column("images", sa.BigInteger(), nullable=False),
        sa.Column("gpu_s", sa.Float(), nullable=False),
        sa.Column("lost_gpu_s", sa.Float(), nullable=False),
        sa.Column("pixel_steps", sa.BigInteger(), nullable=False),
        sa.Column("queue_s", sa.Float(), nullable=False),
        sa.Column("total_s", sa.Float(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "day", "batch_id", "lane", name="pk_usage_rollup"),
    )
    op.create_index("ix_usage_rollup_day", "usage_rollup", ["day"])
    op.create_table(
        "tenant_quotas",
        sa.Column("tenant", sa.String(100), nullable=False),
        sa.Column("images_per_day", sa.BigInteger(), nullable=True),
        sa.Column("images_per_month", sa.BigInteger(), nullable=True),
        sa.Column("gpu_s_per_day", sa.Float(), nullable=True),
        sa.Column("gpu_s_per_month", sa.Float(), nullable=True),
        sa.Column("max_running", sa.Integer(), nullable=True),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", name="pk_tenant_quotas"),
    )
    op.create_table(
        "quota_refusals",
        sa.Column("tenant", sa.String(100), nullable=False),
        sa.Column("quota", sa.String(32), nullable=False),
        sa.Column("refusals", sa.BigInteger(), nullable=False),
        sa.Column("last_refused_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "quota", name="pk_quota_refusals"),
    )


def downgrade() -> None:
    """Drop them."""
    op.drop_table("quota_refusals")
    op.drop_table("tenant_quotas")
    op.drop_index("ix_usage_rollup_day", table_name="usage_rollup")
    op.drop_table("usage_rollup")
    with op.batch_alter_table("jobs") as batch:
        for column in ("total_s", "queue_s", "pixel_steps", "steps_run", "attempt_gpu_s", "lost_gpu_s", "gpu_s"):
            batch.drop_column(column)
