"""Nightly render plans: `plans` and their `plan_slots` (one row per slot, unique per plan and time).

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | None = None
depends_on: str | None = None


def _plans() -> None:
    op.create_table(
        "plans",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("schedule", sa.String(200), nullable=False),
        sa.Column("timezone", sa.String(64), nullable=False),
        sa.Column("manifest", sa.Text(), nullable=False),
        sa.Column("model_set", sa.String(200), nullable=False),
        sa.Column("tenant", sa.String(100), nullable=False),
        sa.Column("lane", sa.String(32), nullable=False),
        sa.Column("defaults", sa.Text(), nullable=False),
        sa.Column("catch_up", sa.String(8), nullable=False),
        sa.Column("overlap", sa.String(8), nullable=False),
        sa.Column("webhook_url", sa.Text(), nullable=True),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("source", sa.Text(), nullable=False),
        sa.Column("schedule_from", sa.DateTime(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("updated_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_plans"),
        sa.UniqueConstraint("name", name="uq_plans_name"),
    )


def _plan_slots() -> None:
    op.create_table(
        "plan_slots",
        sa.Column("id", sa.String(36), nullable=False),
        sa.Column("plan_id", sa.String(36), nullable=False),
        sa.Column("slot_at", sa.DateTime(), nullable=False),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("status", sa.String(16), nullable=False),
        sa.Column("batch_id", sa.String(36), nullable=True),
        sa.Column("reason", sa.Text(), nullable=True),
        sa.Column("decided_at", sa.DateTime(), nullable=False),
        sa.Column("decided_by", sa.String(255), nullable=False),
        sa.ForeignKeyConstraint(["plan_id"], ["plans.id"], name="fk_plan_slots_plan_id_plans"),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name="fk_plan_slots_batch_id_batches"),
        sa.PrimaryKeyConstraint("id", name="pk_plan_slots"),
        sa.UniqueConstraint("plan_id", "slot_at", name="uq_plan_slots_plan_id_slot_at"),
    )


def upgrade() -> None:
    """Create `plans` and `plan_slots`."""
    _plans()
    _plan_slots()


def downgrade() -> None:
    """Drop `plan_slots` and `plans`."""
    op.drop_table("plan_slots")
    op.drop_table("plans")
