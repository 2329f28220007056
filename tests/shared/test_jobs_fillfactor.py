"""PostgreSQL: a job row's next version stays in its page (migration 0011), so the dispatch mark,
which changes no indexed column, adds nothing to the table's six indexes."""

from __future__ import annotations

import pytest
from sqlalchemy import Engine, text

from shared.db import make_engine, upgrade_database
from tests.conftest import migrate

pytestmark = pytest.mark.postgres

ROWS = 400
SPEC = '{"prompt": "' + "a lighthouse at dusk, " * 20 + '"}'  # a spec of a usual size (some 450 bytes)
# One job of each page of the table (a page's row numbers restart at 1).
ONE_PER_PAGE = text("SELECT id FROM jobs WHERE ctid::text LIKE '%,1)'")
# Heap-only updates this connection made that it has not reported to the statistics yet.
HOT_SO_FAR = text("SELECT pg_stat_get_xact_tuples_hot_updated(CAST('jobs' AS regclass))")


def _submit(engine: Engine, batch: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            text("INSERT INTO batches (id, name, model_set, created_at, job_count) VALUES (:b, :b, 'm', now(), :n)"),
            {"b": batch, "n": ROWS},
        )
        conn.execute(
            text(
                "INSERT INTO jobs (id, batch_id, line, lane, dedupe_key, spec, seed, status, queued_at)"
                " SELECT :b || '-' || g, :b, g, 'bulk', 'd' || g, :spec, g, 'queued', now()"
                " FROM generate_series(1, :n) g"
            ),
            {"b": batch, "n": ROWS, "spec": SPEC},
        )


def _marked_in_place(engine: Engine, batch: str) -> tuple[int, int]:
    """The dispatch mark of one job per page of `batch`: (jobs marked, of them heap-only updates)."""
    with engine.begin() as conn:
        ids = [r[0] for r in conn.execute(ONE_PER_PAGE) if r[0].startswith(batch + "-")]
        before = int(conn.execute(HOT_SO_FAR).scalar_one())  # counts not yet reported may include earlier ones
        conn.execute(text("UPDATE jobs SET enqueued_at = now() WHERE id = ANY(:ids)"), {"ids": ids})
        return len(ids), int(conn.execute(HOT_SO_FAR).scalar_one()) - before


def test_the_dispatch_mark_rewrites_the_row_in_its_page_and_no_index(postgres_url: str) -> None:
    upgrade_database(postgres_url)
    engine = make_engine(postgres_url)
    try:
        _submit(engine, "roomy")
        marked, in_place = _marked_in_place(engine, "roomy")
        assert marked >= 10 and in_place == marked

        # Pages filled to the brim (the schema before 0011): the marked rows move, and every index grows.
        migrate(engine, postgres_url, "0010", down=True)
        _submit(engine, "full")
        marked, in_place = _marked_in_place(engine, "full")
        assert marked >= 10 and in_place <= 1  # the last page alone may have room
    finally:
        migrate(engine, postgres_url, "head")
        engine.dispose()
