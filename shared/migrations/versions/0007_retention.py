"""Retention: when each job's data expires, what the janitor removed, and what keeps a reference alive.

- `jobs.expires_after_s` (the retention of its objects, counted from when it finishes; NULL:
  for ever), `jobs.expires_at` (set as it finishes, or by a deletion), `jobs.data_state`
  (`removing`, `removed`; NULL: kept), `jobs.data_removed_at`, `jobs.deleted_at`; a partial
  index on (data_state, expires_at) over the rows that expire at all, and one on (status,
  finished_at) over finished rows (the throughput of every queue forecast read them all).
- `batches.deleted_at`, `batches.removed_count` (jobs whose objects are gone),
  `reference_images.removing_at` (the janitor's mark), `tenants.expires_after_s` (a tenant's
  default retention).
- `batch_references`: the reference images each batch's jobs use, filled here from the
  jobs' specs, so that the janitor never removes an image that an older job still uses.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-03
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | None = None
depends_on: str | None = None

# The (batch, reference) pairs of every job already there, from the spec JSON of each.
BACKFILL_POSTGRESQL = """
INSERT INTO batch_references (batch_id, sha256)
SELECT DISTINCT j.batch_id, r.value ->> 'sha256'
FROM jobs AS j, json_array_elements(CAST(j.spec AS json) -> 'references') AS r(value)
WHERE EXISTS (SELECT 1 FROM reference_images AS i WHERE i.sha256 = r.value ->> 'sha256')
ON CONFLICT DO NOTHING
"""
BACKFILL_SQLITE = """
INSERT OR IGNORE INTO batch_references (batch_id, sha256)
SELECT DISTINCT j.batch_id, json_extract(r.value, '$.sha256')
FROM jobs AS j, json_each(j.spec, '$.references') AS r
WHERE EXISTS (SELECT 1 FROM reference_images AS i WHERE i.sha256 = json_extract(r.value, '$.sha256'))
"""


def upgrade() -> None:
    """Add the retention columns, the janitor's index and `batch_references` (filled from the jobs)."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("expires_after_s", sa.BigInteger(), nullable=True))
        batch.add_column(sa.Column("expires_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("data_state", sa.String(16), nullable=True))
        batch.add_column(sa.Column("data_removed_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("deleted_at", sa.DateTime(), nullable=True))
    finished = sa.text("finished_at IS NOT NULL")
    op.create_index(
        "ix_jobs_status_finished_at",
        "jobs",
        ["status", "finished_at"],
        postgresql_where=finished,
        sqlite_where=finished,
    )
    where = sa.text("expires_at IS NOT NULL")
    op.create_index(
        "ix_jobs_data_state_expires_at",
        "jobs",
        ["data_state", "expires_at"],
        postgresql_where=where,
        sqlite_where=where,
    )
    with op.batch_alter_table("batches") as batch:
        batch.add_column(sa.Column("deleted_at", sa.DateTime(), nullable=True))
        batch.add_column(sa.Column("removed_count", sa.Integer(), server_default="0", nullable=False))
    with op.batch_alter_table("reference_images") as batch:
        batch.add_column(sa.Column("removing_at", sa.DateTime(), nullable=True))
    op.create_index("ix_reference_images_removing_at", "reference_images", ["removing_at"])
    with op.batch_alter_table("tenants") as batch:
        batch.add_column(sa.Column("expires_after_s", sa.BigInteger(), nullable=True))
    op.create_table(
        "batch_references",
        sa.Column("batch_id", sa.String(36), nullable=False),
        sa.Column("sha256", sa.String(64), nullable=False),
        sa.ForeignKeyConstraint(["batch_id"], ["batches.id"], name="fk_batch_references_batch_id_batches"),
        sa.ForeignKeyConstraint(
            ["sha256"], ["reference_images.sha256"], name="fk_batch_references_sha256_reference_images"
        ),
        sa.PrimaryKeyConstraint("batch_id", "sha256", name="pk_batch_references"),
    )
    op.create_index("ix_batch_references_sha256", "batch_references", ["sha256"])
    dialect = op.get_bind().dialect.name
    op.execute(BACKFILL_POSTGRESQL if dialect == "postgresql" else BACKFILL_SQLITE)


def downgrade() -> None:
    """Drop them."""
    op.drop_index("ix_batch_references_sha256", table_name="batch_references")
    op.drop_table("batch_references")
    with op.batch_alter_table("tenants") as batch:
        batch.drop_column("expires_after_s")
    op.drop_index("ix_reference_images_removing_at", table_name="reference_images")
    with op.batch_alter_table("reference_images") as batch:
        batch.drop_column("removing_at")
    with op.batch_alter_table("batches") as batch:
        batch.drop_column("removed_count")
        batch.drop_column("deleted_at")
    op.drop_index("ix_jobs_data_state_expires_at", table_name="jobs")
    op.drop_index("ix_jobs_status_finished_at", table_name="jobs")
    with op.batch_alter_table("jobs") as batch:
        for column in ("deleted_at", "data_removed_at", "data_state", "expires_at", "expires_after_s"):
            batch.drop_column(column)
