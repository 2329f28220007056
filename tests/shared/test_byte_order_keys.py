"""PostgreSQL: the job and batch keys compare as bytes, and every pair of columns compared with each
other agrees on it (migration 0010)."""

from __future__ import annotations

import pytest
from sqlalchemy import Connection, text
from sqlalchemy.exc import IntegrityError

from shared.db import make_engine, upgrade_database
from tests.conftest import migrate

pytestmark = pytest.mark.postgres

# Columns that the control plane's statements compare with one another (joins, IN lists, EXISTS):
# two implicit collations that differ make PostgreSQL refuse the comparison at run time.
COMPARED = [
    (("jobs", "batch_id"), ("batches", "id")),
    (("batch_references", "batch_id"), ("batches", "id")),
    (("plan_slots", "batch_id"), ("batches", "id")),
    (("usage_rollup", "batch_id"), ("batches", "id")),
    (("webhook_subscriptions", "subject_id"), ("jobs", "id")),
    (("webhook_subscriptions", "subject_id"), ("batches", "id")),
    (("webhook_subscriptions", "subject_id"), ("jobs", "batch_id")),
    (("webhook_outbox", "subject_id"), ("webhook_subscriptions", "subject_id")),
]
KEY_COLUMNS = [("jobs", "id"), ("jobs", "batch_id"), ("jobs", "status"), ("jobs", "lane"), ("jobs", "dedupe_key")]

COLLATION = text(
    "SELECT coalesce(c.collname, '') FROM pg_attribute a LEFT JOIN pg_collation c ON c.oid = a.attcollation"
    " WHERE a.attrelid = CAST(:table AS regclass) AND a.attname = :column"
)
# Both ends of every foreign key, with their collations.
FOREIGN_KEYS = text(
    "SELECT con.conname, ca.collname, cb.collname FROM pg_constraint con"
    " JOIN pg_attribute a ON a.attrelid = con.conrelid AND a.attnum = con.conkey[1]"
    " JOIN pg_attribute b ON b.attrelid = con.confrelid AND b.attnum = con.confkey[1]"
    " LEFT JOIN pg_collation ca ON ca.oid = a.attcollation LEFT JOIN pg_collation cb ON cb.oid = b.attcollation"
    " WHERE con.contype = 'f'"
)


def _collation(conn: Connection, table: str, column: str) -> str:
    return str(conn.execute(COLLATION, {"table": table, "column": column}).scalar_one())


def test_the_job_keys_compare_as_bytes_and_every_compared_pair_agrees(postgres_url: str) -> None:
    upgrade_database(postgres_url)
    engine = make_engine(postgres_url)
    with engine.connect() as conn:
        assert {key: _collation(conn, *key) for key in KEY_COLUMNS} == {key: "C" for key in KEY_COLUMNS}
        for left, right in COMPARED:
            assert _collation(conn, *left) == _collation(conn, *right), (left, right)
        foreign_keys = conn.execute(FOREIGN_KEYS).all()
        assert foreign_keys, "the schema has foreign keys"
        assert [fk for fk in foreign_keys if fk[1] != fk[2]] == []
        # The statements that compare them run (a mismatch fails here, not only in the catalog).
        conn.execute(
            text(
                "SELECT count(*) FROM jobs JOIN batches ON batches.id = jobs.batch_id"
                " JOIN webhook_subscriptions s ON s.subject_id IN (jobs.id, batches.id)"
                " JOIN usage_rollup u ON u.batch_id = batches.id"
            )
        ).scalar_one()
    engine.dispose()


def test_the_collation_migration_keeps_the_rows_and_the_foreign_keys_both_ways(postgres_url: str) -> None:
    engine = make_engine(postgres_url)
    migrate(engine, postgres_url, "0009")
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO batches (id, name, model_set, created_at, job_count) VALUES ('b-1', 'kept', 'm', now(), 1)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO jobs (id, batch_id, line, lane, dedupe_key, spec, seed, status, queued_at) "
                "VALUES ('j-1', 'b-1', 1, 'bulk', 'd', '{}', 7, 'queued', now())"
            )
        )
    for target in ("0010", "0009", "head"):
        migrate(engine, postgres_url, target, down=target == "0009")
        with engine.connect() as conn:
            row = conn.execute(text("SELECT jobs.seed FROM jobs JOIN batches ON batches.id = jobs.batch_id")).one()
            assert row.seed == 7
            with pytest.raises(IntegrityError, match="foreign key"):
                conn.execute(
                    text(
                        "INSERT INTO jobs (id, batch_id, line, lane, dedupe_key, spec, seed, status, queued_at) "
                        "VALUES ('j-2', 'no-such-batch', 2, 'bulk', 'e', '{}', 1, 'queued', now())"
                    )
                )
            conn.rollback()
            assert _collation(conn, "jobs", "id") == ("default" if target == "0009" else "C")
    engine.dispose()
