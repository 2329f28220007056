"""Bulk job inserts: rows a concurrent submission inserted first are skipped, and only fresh ids come back."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from shared.db import (
    PG_VALUES_ROWS,
    SQLITE_ID_CHUNK,
    Batch,
    Job,
    JobStatus,
    ensure_database,
    insert_new_jobs,
    make_engine,
    make_session_factory,
    new_id,
    utcnow,
)


def _rows(keys: list[str]) -> list[tuple[object, ...]]:
    spec = '{"params":{"prompt":"tab\\there, 100% \\"quoted\\"\\n"},"references":[]}'
    return [
        (new_id(), line, None if line % 2 else f"c{line}", key, spec, 2**63 - 1, "interactive" if line else "bulk")
        for line, key in enumerate(keys)
    ]


def test_insert_new_jobs_returns_only_the_rows_it_inserted_and_stores_them_queued(database_url: str) -> None:
    ensure_database(database_url)
    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    now = utcnow()
    with sessions.begin() as session:
        batch = Batch(id=new_id(), name="b", model_set="m", job_count=0)
        session.add(batch)
        session.flush()
        first = _rows(["k1", "k2"])
        assert insert_new_jobs(session, batch_id=batch.id, queued_at=now, rows=first) == {r[0] for r in first}
    with sessions.begin() as session:
        again = _rows(["k2", "k3", "k4"])  # k2 was inserted by "another submission"
        inserted = insert_new_jobs(session, batch_id=batch.id, queued_at=now, rows=again)
        assert inserted == {again[1][0], again[2][0]}
    with sessions() as session:
        jobs = session.scalars(select(Job).where(Job.batch_id == batch.id)).all()
        assert sorted(j.dedupe_key for j in jobs) == ["k1", "k2", "k3", "k4"]
        assert {j.status for j in jobs} == {JobStatus.queued.value}
        # Queued for the dispatcher: not yet handed to Redis.
        assert {j.queued_at for j in jobs} == {now} and {j.enqueued_at for j in jobs} == {None}
        assert {(j.line, j.lane) for j in jobs} == {(0, "bulk"), (1, "interactive"), (2, "interactive")}
        assert {j.attempts for j in jobs} == {0} and {j.seed for j in jobs} == {2**63 - 1}
        assert all(j.spec == first[0][4] for j in jobs)
        assert {j.client_id for j in jobs if j.line == 0} == {"c0"}
    engine.dispose()


@pytest.mark.parametrize("count", [0, 3, PG_VALUES_ROWS + 1, SQLITE_ID_CHUNK + 20])
def test_a_clash_in_a_large_or_small_insert_returns_exactly_the_fresh_ids(database_url: str, count: int) -> None:
    """Small inserts go in one statement and large ones in bulk; both skip rows already there."""
    ensure_database(database_url)
    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        batch = Batch(id=new_id(), name="b", model_set="m", job_count=0)
        session.add(batch)
        session.flush()
        keys = [f"k{i}" for i in range(count)]
        insert_new_jobs(session, batch_id=batch.id, queued_at=utcnow(), rows=_rows(keys[::2]))
    with sessions.begin() as session:
        rows = _rows(keys)
        inserted = insert_new_jobs(session, batch_id=batch.id, queued_at=utcnow(), rows=rows)
    assert inserted == {row[0] for row in rows if int(str(row[3])[1:]) % 2}
    with sessions() as session:
        stored = session.scalars(select(Job.dedupe_key).where(Job.batch_id == batch.id)).all()
    assert sorted(stored) == sorted(keys)
    engine.dispose()
