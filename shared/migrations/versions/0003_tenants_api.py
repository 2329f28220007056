"""Tenants and the HTTP API: keys, tenant references, idempotency records, webhooks; batches get a tenant.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | None = None
depends_on: str | None = None


def _tenants_and_keys() -> None:
    op.create_table(
        "tenants",
        sa.Column("name", sa.String(100), nullable=False),
        sa.Column("webhook_secret", sa.String(100), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("name", name="pk_tenants"),
    )
    op.create_table(
        "api_keys",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("tenant", sa.String(100), nullable=False),
        sa.Column("admin", sa.Boolean(), nullable=False),
        sa.Column("key_sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("revoked_at", sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(["tenant"], ["tenants.name"], name="fk_api_keys_tenant_tenants"),
        sa.PrimaryKeyConstraint("id", name="pk_api_keys"),
        sa.UniqueConstraint("key_sha256", name="uq_api_keys_key_sha256"),
    )
    op.create_table(
        "tenant_references",
        sa.Column("tenant", sa.String(100), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(
            ["sha256"], ["reference_images.sha256"], name="fk_tenant_references_sha256_reference_images"
        ),
        sa.PrimaryKeyConstraint("tenant", "sha256", name="pk_tenant_references"),
    )
    op.create_table(
        "idempotency_records",
        sa.Column("tenant", sa.String(100), nullable=False),
        sa.Column("key", sa.String(255), nullable=False),
        sa.Column("request_sha256", sa.String(64), nullable=False),
        sa.Column("status_code", sa.Integer(), nullable=True),
        sa.Column("response_body", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint("tenant", "key", name="pk_idempotency_records"),
    )
    op.create_index("ix_idempotency_records_created_at", "idempotency_records", ["created_at"])


def _webhooks() -> None:
    op.create_table(
        "webhook_subscriptions",
        sa.Column("subject_id", sa.String(36), nullable=False),
        sa.Column("kind", sa.String(8), nullable=False),
        sa.Column("tenant", sa.String(100), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("events", sa.Text(), nullable=False),
        sa.Column("notified_at", sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint("subject_id", name="pk_webhook_subscriptions"),
    )
    op.create_index("ix_webhook_subscriptions_notified_at_kind", "webhook_subscriptions", ["notified_at", "kind"])
    op.create_table(
        "webhook_outbox",
        sa.Column("id", sa.String(40), nullable=False),
        sa.Column("tenant", sa.String(100), nullable=False),
        sa.Column("url", sa.Text(), nullable=False),
        sa.Column("event_type", sa.String(40), nullable=False),
        sa.Column("subject_id", sa.String(36), nullable=False),
        sa.Column("payload", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(), nullable=False),
        sa.Column("next_attempt_at", sa.DateTime(), nullable=False),
        sa.Column("delivered_at", sa.DateTime(), nullable=True),
        sa.Column("failed_at", sa.DateTime(), nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_webhook_outbox"),
        sa.UniqueConstraint("subject_id", "event_type", name="uq_webhook_outbox_subject_id_event_type"),
    )
    op.create_index(
        "ix_webhook_outbox_delivered_at_next_attempt_at", "webhook_outbox", ["delivered_at", "next_attempt_at"]
    )


def upgrade() -> None:
    """Create the tenant and API tables; every existing batch belongs to tenant `default`."""
    _tenants_and_keys()
    _webhooks()
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("tenant", sa.String(100), server_default="default", nullable=False))
        batch.create_index("ix_batches_tenant", ["tenant"])


def downgrade() -> None:
    """Drop everything `upgrade` created."""
    with op.batch_alter_table("batches") as batch:
        batch.drop_index("ix_batches_tenant")
        batch.drop_column("tenant")
    op.drop_table("webhook_outbox")
    op.drop_table("webhook_subscriptions")
    op.drop_table("idempotency_records")
    op.drop_table("tenant_references")
    op.drop_table("api_keys")
    op.drop_table("tenants")
