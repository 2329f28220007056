"""Plans remember the model-set toml their file named, so each slot applies that set's rules.

- `plans.model_set_file`: the absolute path of the model-set toml a plan file's `model_set`
  named; every slot reads its [defaults] and [limits] again. NULL for a set named by its name
  (IPAB_MODEL_SET's rules when it is that set) and for the plans applied before this revision,
  which get the file once they are applied again.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | None = None
depends_on: str | None = None


def upgrade() -> None:
    """Add `plans.model_set_file`."""
    with op.batch_alter_table("plans") as batch:
        batch.add_column(sa.Column("model_set_file", sa.Text(), nullable=True))


def downgrade() -> None:
    """Drop it again."""
    with op.batch_alter_table("plans") as batch:
        batch.drop_column("model_set_file")
