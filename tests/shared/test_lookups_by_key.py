"""A job's own statements (claim, renew, finish, fail, dispatch mark) find it by its primary key,
however stale the planner's statistics.

Found in a PostgreSQL profile of bench.control_plane: on a database whose statistics were taken
when the table was small (a young install, an ANALYZE while nothing ran), the planner rated the
status index as good as the key and walked every running or queued entry, dead ones too, for each
finish and dispatch: finishes cost 5-7x their work. The plans are read with EXPLAIN of the very
statements the functions send, on a table whose statistics say "10 queued jobs" and which holds
thousands of running and queued ones.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from sqlalchemy import text, update
from sqlalchemy.orm import Session, sessionmaker

from shared.db import Batch, Job, JobStatus, insert_new_jobs, new_id, utcnow
from shared.dispatch.dispatcher import mark_dispatched
from shared.jobs import JobResult, claim_job, fail_job, finish_job, renew_lease
from tests.shared.conftest import engine_events

pytestmark = pytest.mark.postgres

JOB_INDEXES = ("pk_jobs", "ix_jobs_", "uq_jobs_")  # the naming convention's names of the jobs table's indexes
RESULT = JobResult(
    output_key="k", output_sha256="0" * 64, output_bytes=1, encode_s=0.0, denoise_s=0.0, upload_s=0.0, gpu_s=0.1
)


@pytest.fixture
def database_url(postgres_url: str) -> str:
    return postgres_url


def _stale_table(sessions: sessionmaker[Session]) -> tuple[list[str], list[str]]:
    """10 queued jobs, ANALYZEd; then 3,000 running and 3,000 queued ones the statistics do not know of.
    Returns (running ids, queued ids)."""

    def add(session: Session, batch_id: str, count: int) -> list[str]:
        rows = [(new_id(), i, None, new_id(), "{}", i, "bulk") for i in range(count)]
        insert_new_jobs(session, batch_id=batch_id, queued_at=utcnow(), rows=rows)
        return [r[0] for r in rows]

    with sessions.begin() as session:
        batch = Batch(id=new_id(), name=f"b-{new_id()[:8]}", model_set="tiny", job_count=0, tenant="acme")
        session.add(batch)
        session.flush()
        batch_id = batch.id
        add(session, batch_id, 10)
    with sessions.kw["bind"].connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE jobs"))
        conn.execute(text("ALTER TABLE jobs SET (autovacuum_enabled = false)"))  # the statistics stay stale
    with sessions.begin() as session:
        running, queued = add(session, batch_id, 3000), add(session, batch_id, 3000)
        session.execute(
            update(Job)
            .where(Job.id.in_(running))
            .values(status=JobStatus.running.value, attempts=1, started_at=utcnow(), lease_expires_at=utcnow())
        )
    return running, queued


@contextmanager
def _plans(sessions: sessionmaker[Session]) -> Iterator[list[dict[str, Any]]]:
    """EXPLAIN (FORMAT JSON) instead of every UPDATE, INSERT or WITH the block sends (nothing changes); the plans."""
    engine = sessions.kw["bind"]
    plans: list[dict[str, Any]] = []

    def explain(_conn: Any, _cursor: Any, sql: str, params: Any, _context: Any, _many: bool) -> tuple[str, Any]:
        if sql.lstrip().upper().startswith(("UPDATE", "WITH", "INSERT")):
            sql = "EXPLAIN (FORMAT JSON) " + sql
        return sql, params

    def read(_conn: Any, cursor: Any, sql: str, *_: Any) -> None:
        if sql.startswith("EXPLAIN"):
            plans.append(_loaded(cursor.fetchone()[0]))

    listeners = {"before_cursor_execute": explain, "after_cursor_execute": read}
    with engine_events(engine, listeners, retval=["before_cursor_execute"]):
        yield plans


def _loaded(value: Any) -> dict[str, Any]:
    plan = value if isinstance(value, list) else json.loads(value)
    root: dict[str, Any] = plan[0]["Plan"]
    return root


def _job_indexes(plan: dict[str, Any]) -> set[str]:
    """How the plan reaches the `jobs` table: the names of the indexes of it that it scans, "seq" for a
    sequential scan."""
    found: set[str] = set()
    if plan.get("Node Type") == "Seq Scan" and plan.get("Relation Name") == "jobs":
        found.add("seq")
    if plan.get("Index Name", "").startswith(JOB_INDEXES):
        found.add(plan["Index Name"])
    for child in plan.get("Plans", []):
        found |= _job_indexes(child)
    return found


@pytest.mark.parametrize("name", ["claim", "renew", "finish", "fail", "mark"])
def test_a_jobs_own_statements_use_its_primary_key_whatever_the_statistics_say(
    sessions: sessionmaker[Session], name: str
) -> None:
    running, queued = _stale_table(sessions)
    calls = {
        "claim": lambda: claim_job(sessions=sessions, job_id=queued[5], worker_host="h", lease_s=60, max_attempts=3),
        "renew": lambda: renew_lease(sessions=sessions, job_id=running[7], attempt=1, lease_s=60, max_lease_s=600),
        "finish": lambda: finish_job(sessions=sessions, job_id=running[9], attempt=1, result=RESULT),
        "fail": lambda: fail_job(sessions=sessions, job_id=running[11], attempt=1, error_type="E", message="m"),
        "mark": lambda: mark_dispatched(sessions=sessions, job_ids=queued[20:24]),
    }
    with _plans(sessions) as plans:
        calls[name]()
    assert plans, f"{name} sent no UPDATE"
    for plan in plans:
        assert _job_indexes(plan) == {"pk_jobs"}, f"{name} reaches jobs through {_job_indexes(plan)}: {plan}"
