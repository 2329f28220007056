"""Migration 0007 on a database that holds jobs: the images they use are linked to their batches, so
the janitor never takes one an older job still uses."""

from __future__ import annotations

import json

from alembic import command
from sqlalchemy import text

from shared.db import alembic_config, make_engine, upgrade_database


def _upgrade(url: str, revision: str) -> None:
    engine = make_engine(url)
    with engine.begin() as conn:
        cfg = alembic_config(url)
        cfg.attributes["connection"] = conn
        command.upgrade(cfg, revision)
    engine.dispose()


def test_jobs_from_before_0007_keep_their_images_linked_to_their_batches(database_url: str) -> None:
    _upgrade(database_url, "0006")
    used, unknown = "a" * 64, "b" * 64  # `unknown` has no reference_images row: nothing to link
    spec = json.dumps({"params": {"prompt": "p"}, "references": [{"sha256": used, "key": "k"}, {"sha256": unknown}]})
    engine = make_engine(database_url)
    with engine.begin() as conn:
        conn.execute(
            text(
                "INSERT INTO batches (id, name, model_set, created_at, job_count, tenant, paused) "
                "VALUES ('b1', 'one', 'm', '2026-01-01', 2, 'default', false)"
            )
        )
        conn.execute(
            text(
                "INSERT INTO reference_images (sha256, key, ext, width, height, size_bytes, created_at) "
                f"VALUES ('{used}', 'refs/x.png', 'png', 1, 1, 1, '2026-01-01')"
            )
        )
        for job_id in ("j1", "j2"):
            conn.execute(
                text(
                    "INSERT INTO jobs (id, batch_id, line, dedupe_key, spec, seed, status, attempts, attempt_floor, "
                    "queued_at, lane) VALUES (:id, 'b1', 1, :id, :spec, 1, 'succeeded', 1, 0, '2026-01-01', 'bulk')"
                ),
                {"id": job_id, "spec": spec},
            )
    engine.dispose()

    upgrade_database(database_url)

    engine = make_engine(database_url)
    with engine.connect() as conn:
        links = conn.execute(text("SELECT batch_id, sha256 FROM batch_references")).all()
        expiries = conn.execute(text("SELECT expires_after_s, expires_at, data_state FROM jobs")).all()
        removed = conn.execute(text("SELECT removed_count FROM batches")).scalar()
    engine.dispose()
    assert [tuple(row) for row in links] == [("b1", used)]
    assert {tuple(row) for row in expiries} == {(None, None, None)}  # kept for ever, as before
    assert removed == 0
