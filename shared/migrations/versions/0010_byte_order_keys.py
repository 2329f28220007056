"""PostgreSQL: the job and batch keys compare as bytes (`COLLATE "C"`), not by the database's locale.

Every claim, finish and dispatch mark looks a job up by its id and adds entries to indexes
keyed by the batch id, the status, the lane and the dedupe key. Under a locale's collation
(the database default: `en_US.UTF-8`, even `C.UTF-8` on PostgreSQL 15) each comparison in
those B-trees copies both strings and calls `strcoll`; in the byte order it is a `memcmp`.
These columns hold UUIDs, hashes and fixed words, whose order means nothing to a reader:
measured with `bench.job_cost`, the database's CPU per job went from 516-530 µs to 467-489.

The columns compared with one another (`jobs.batch_id = batches.id`, a webhook subscription's
`subject_id` with a job's or a batch's id, the rollup's `batch_id`) change together:
PostgreSQL refuses to compare two columns of different implicit collations.

On a large `jobs` table this rebuilds the indexes on those columns, under a lock that holds
the table's writers until it is done (the rows are not rewritten). SQLite compares bytes
already: nothing changes there.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-06
"""

from __future__ import annotations

from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | None = None
depends_on: str | None = None

# table: (column, varchar length) of every key column that changes, in one ALTER TABLE per table.
BYTE_ORDER_KEYS: dict[str, tuple[tuple[str, int], ...]] = {
    "batches": (("id", 36),),
    "jobs": (("id", 36), ("batch_id", 36), ("status", 16), ("lane", 16), ("dedupe_key", 64)),
    "batch_references": (("batch_id", 36),),
    "plan_slots": (("batch_id", 36),),
    "usage_rollup": (("batch_id", 36),),
    "webhook_subscriptions": (("subject_id", 36),),
    "webhook_outbox": (("subject_id", 36),),
}


def _collate(collation: str) -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    # A foreign key's two columns must agree at every step: drop them, change the columns, add them back.
    foreign_keys = op.get_bind().exec_driver_sql(
        "SELECT conrelid::regclass::text, conname, pg_get_constraintdef(oid) FROM pg_constraint"
        " WHERE contype = 'f' AND confrelid = 'batches'::regclass"
    )
    kept = list(foreign_keys)
    for table, name, _ in kept:
        op.execute(f'ALTER TABLE {table} DROP CONSTRAINT "{name}"')
    for table, columns in BYTE_ORDER_KEYS.items():
        changes = ", ".join(f'ALTER COLUMN {c} TYPE varchar({n}) COLLATE "{collation}"' for c, n in columns)
        op.execute(f"ALTER TABLE {table} {changes}")
    for table, name, definition in kept:
        op.execute(f'ALTER TABLE {table} ADD CONSTRAINT "{name}" {definition}')


def upgrade() -> None:
    """Byte order (`C`) for the key columns on PostgreSQL."""
    _collate("C")


def downgrade() -> None:
    """The database's default collation again."""
    _collate("default")
