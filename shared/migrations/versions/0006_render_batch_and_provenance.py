"""How each job ran: the size of the pipeline call that rendered it, and its provenance record.

`render_batch_size` is the number of jobs in that call (micro-batching); `provenance` is a JSON
object: the sha256 of every weight file of the model set, the ipab, diffusers, transformers
and torch versions, the device and the dtype.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add `jobs.render_batch_size` and `jobs.provenance` (NULL for jobs rendered before)."""
    with op.batch_alter_table("jobs") as batch:
        batch.add_column(sa.Column("render_batch_size", sa.Integer(), nullable=True))
        batch.add_column(sa.Column("provenance", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop them."""
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("provenance")
        batch.drop_column("render_batch_size")
