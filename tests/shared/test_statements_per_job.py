"""What one job costs PostgreSQL, counted: the central database carries every job of the fleet,
so a statement or a transaction added to a job's path is a cost that grows with the fleet
(bench/job_cost.py measures it; BENCHMARKS.md section 3). These counts may only go down."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from shared.db import (
    Batch,
    Job,
    UsageRollup,
    ensure_database,
    insert_new_jobs,
    make_engine,
    make_session_factory,
    new_id,
    utcnow,
)
from shared.dispatch.dispatcher import mark_dispatched
from shared.jobs import JobResult, claim, claim_job, finish_job
from tests.shared.conftest import engine_events


def _jobs(url: str, count: int) -> tuple[sessionmaker[Session], list[str]]:
    ensure_database(url)
    sessions = make_session_factory(make_engine(url))
    with sessions.begin() as session:
        batch = Batch(id=new_id(), name=f"b-{new_id()[:8]}", model_set="tiny", job_count=0, tenant="acme")
        session.add(batch)
        session.flush()
        rows = [(new_id(), i, None, f"k{i}", "{}", i, "bulk") for i in range(count)]
        insert_new_jobs(session, batch_id=batch.id, queued_at=utcnow(), rows=rows)
    return sessions, [r[0] for r in rows]


@contextmanager
def _counted(sessions: sessionmaker[Session]) -> Iterator[Counter[str]]:
    """Statements sent (by first word), COMMITs sent, and statements run in autocommit (each its
    own transaction, with no BEGIN or COMMIT round trip), while the block runs."""
    counts: Counter[str] = Counter()
    engine = sessions.kw["bind"]

    def statement(conn: Any, _cursor: Any, sql: str, *_: Any) -> None:
        counts[sql.split(None, 1)[0].upper()] += 1
        if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
            counts["autocommit"] += 1

    def commit(_conn: Any) -> None:
        counts["commits"] += 1

    with engine_events(engine, {"before_cursor_execute": statement, "commit": commit}):
        yield counts


def _result() -> JobResult:
    return JobResult(
        output_key="k", output_sha256="0" * 64, output_bytes=1, encode_s=0, denoise_s=0, upload_s=0, gpu_s=0.5
    )


def test_a_job_costs_postgresql_three_statements_each_its_own_transaction(postgres_url: str) -> None:
    sessions, (job_id,) = _jobs(postgres_url, 1)
    with _counted(sessions) as dispatched:
        assert mark_dispatched(sessions=sessions, job_ids=[job_id]) == {job_id}
    with _counted(sessions) as claimed:
        claimed_job = claim(sessions=sessions, job_id=job_id, worker_host="w", lease_s=30, max_attempts=3)
    # The claim returns what its worker notes (log lines' tenant, the queue wait): no read after it.
    assert claimed_job is not None and (claimed_job.attempt, claimed_job.tenant) == (1, "acme")
    assert claimed_job.queued_at <= claimed_job.started_at
    attempt = claimed_job.attempt
    with _counted(sessions) as finished:
        assert finish_job(sessions=sessions, job_id=job_id, attempt=attempt, result=_result())
    # Each in autocommit: no BEGIN, no COMMIT. The mark's one UPDATE turns its own commit's wait
    # for the WAL flush off (set_config, as SET LOCAL would: see the next test).
    assert dispatched == Counter({"UPDATE": 1, "autocommit": 1})
    assert claimed == Counter({"UPDATE": 1, "autocommit": 1})
    # The finish and its usage rollup: one statement (WITH ... UPDATE ... INSERT ... ON CONFLICT).
    assert finished == Counter({"WITH": 1, "autocommit": 1})
    with sessions() as session:
        rollup = session.scalars(select(UsageRollup)).one()
        assert (rollup.jobs, rollup.images, rollup.gpu_s) == (1, 1, 0.5)
        assert session.scalars(select(Job.status).where(Job.id == job_id)).one() == "succeeded"


def test_a_fenced_out_finish_in_one_statement_changes_nothing(postgres_url: str) -> None:
    sessions, (job_id,) = _jobs(postgres_url, 1)
    attempt = claim_job(sessions=sessions, job_id=job_id, worker_host="w", lease_s=30, max_attempts=3)
    assert attempt == 1
    assert not finish_job(sessions=sessions, job_id=job_id, attempt=attempt + 1, result=_result())
    assert finish_job(sessions=sessions, job_id=job_id, attempt=attempt, result=_result())
    assert not finish_job(sessions=sessions, job_id=job_id, attempt=attempt, result=_result())  # a replay
    with sessions() as session:
        assert session.scalars(select(UsageRollup.jobs)).all() == [1]


def test_the_marks_asynchronous_commit_ends_with_it_on_the_connection_a_claim_uses_next(postgres_url: str) -> None:
    # A finish (or a claim) that ran with `synchronous_commit` off could be lost in a crash.
    sessions, job_ids = _jobs(postgres_url, 2)

    def connection_setting() -> tuple[int, str]:
        with sessions() as session:  # the pool's one connection, the one the mark used
            row = session.execute(text("SELECT pg_backend_pid(), current_setting('synchronous_commit')")).one()
        return int(row[0]), str(row[1])

    backend, _ = connection_setting()
    assert mark_dispatched(sessions=sessions, job_ids=job_ids) == set(job_ids)
    assert connection_setting() == (backend, "on")
    attempt = claim_job(sessions=sessions, job_id=job_ids[0], worker_host="w", lease_s=30, max_attempts=3)
    assert attempt == 1 and connection_setting() == (backend, "on")


def test_a_connection_that_ran_in_autocommit_goes_back_to_the_pool_transactional(postgres_url: str) -> None:
    # The pool's next user (a cancel, a submission) must get BEGIN ... COMMIT, all or nothing.
    sessions, (job_id,) = _jobs(postgres_url, 1)
    assert claim_job(sessions=sessions, job_id=job_id, worker_host="w", lease_s=30, max_attempts=3) == 1
    with pytest.raises(RuntimeError), sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(worker_host="changed"))
        raise RuntimeError("the transaction fails after its first statement")
    with sessions() as session:
        assert session.scalars(select(Job.worker_host).where(Job.id == job_id)).one() == "w"


def test_marks_of_any_count_are_one_statement_the_server_parses_once(postgres_url: str) -> None:
    # A dispatch round marks as many jobs as workers took since the last one, a different count from
    # round to round. One statement text for every count: the driver prepares it once, instead of
    # the server parsing a new IN list (and the dispatcher building its text) whenever the count changes.
    sessions, job_ids = _jobs(postgres_url, 40)
    texts: set[str] = set()

    def statement(_conn: Any, _cursor: Any, sql: str, *_: Any) -> None:
        texts.add(sql)

    marked: set[str] = set()
    with engine_events(sessions.kw["bind"], {"before_cursor_execute": statement}):
        start = 0
        for count in (1, 3, 2, 7, 4, 1, 5, 6, 2, 9):  # 40 jobs in ten rounds of ten counts
            marked |= mark_dispatched(sessions=sessions, job_ids=job_ids[start : start + count])
            start += count
    assert marked == set(job_ids)
    assert len(texts) == 1, f"{len(texts)} statement texts for ten marks: {sorted(texts)}"
    with sessions() as session:  # the pool's one connection, the one that marked
        prepared = session.execute(
            text("SELECT statement FROM pg_prepared_statements WHERE statement LIKE 'UPDATE jobs SET enqueued_at%'")
        ).all()
    assert len(prepared) == 1, prepared
    assert mark_dispatched(sessions=sessions, job_ids=job_ids[:5]) == set()  # marked once only
