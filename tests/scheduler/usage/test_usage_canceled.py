"""A canceled job counts in the usage report: the steps it ran before it stopped are billed
(`ipab cancel` and DELETE /v1/jobs/... both end it), its earlier lost attempts are shown as lost."""

from __future__ import annotations

import pytest
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from scheduler.batches.actions import cancel
from scheduler.batches.deletion import mark_batch_jobs, request_batch_deletion, request_job_deletion
from scheduler.usage.report import UsageQuery, usage_report
from shared.db import Batch, Job, ensure_database, insert_new_jobs, make_engine, make_session_factory, new_id, utcnow
from shared.jobs import claim_job, record_left_attempt, transaction
from shared.usage import AttemptUsage

PIXELS = 64 * 64


def jobs(url: str, count: int) -> tuple[sessionmaker[Session], str, list[str]]:
    ensure_database(url)
    sessions = make_session_factory(make_engine(url))
    with sessions.begin() as session:
        batch = Batch(id=new_id(), name="posters", model_set="tiny", job_count=0, tenant="acme")
        session.add(batch)
        session.flush()
        rows = [(new_id(), i, None, f"k{i}", "{}", i, "bulk") for i in range(count)]
        insert_new_jobs(session, batch_id=batch.id, queued_at=utcnow(), rows=rows)
    return sessions, batch.id, [r[0] for r in rows]


def report(sessions: sessionmaker[Session]) -> dict[str, float]:
    with transaction(sessions) as session:
        return usage_report(session=session, query=UsageQuery(tenant="acme")).totals["acme"]


def test_a_running_job_canceled_is_reported_with_the_steps_it_ran(database_url: str) -> None:
    sessions, batch_id, (running, waiting) = jobs(database_url, 2)
    attempt = claim_job(sessions=sessions, job_id=running, worker_host="w", lease_s=30, max_attempts=3)
    assert attempt is not None
    with transaction(sessions) as session:
        assert sorted(cancel(session=session, batch_id=batch_id)) == sorted([running, waiting])
    # Its worker notices at its next step and reports the 3 steps it ran.
    usage = AttemptUsage(gpu_s=0.75, steps_run=3, pixels=PIXELS)
    assert record_left_attempt(sessions=sessions, job_id=running, attempt=attempt, usage=usage, reported_s=0.0)

    totals = report(sessions)
    assert (totals["jobs"], totals["images"], totals["pixel_steps"]) == (2, 0, 3 * PIXELS)
    assert totals["gpu_seconds"] == pytest.approx(0.75) and totals["lost_gpu_seconds"] == 0.0


def test_a_queued_job_canceled_by_its_deletion_keeps_its_lost_seconds_in_the_report(database_url: str) -> None:
    sessions, batch_id, (job_id,) = jobs(database_url, 1)
    with transaction(sessions) as session:  # an earlier attempt was lost: 2 s shown, not billed
        session.execute(update(Job).where(Job.id == job_id).values(lost_gpu_s=2.0))
        request_batch_deletion(session=session, batch_id=batch_id)
    assert mark_batch_jobs(sessions=sessions, batch_id=batch_id) == 1

    totals = report(sessions)
    assert (totals["jobs"], totals["gpu_seconds"]) == (1, 0.0) and totals["lost_gpu_seconds"] == pytest.approx(2.0)


def test_a_queued_job_deleted_alone_keeps_its_lost_seconds_in_the_report(database_url: str) -> None:
    sessions, _, (job_id,) = jobs(database_url, 1)
    with transaction(sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(lost_gpu_s=2.0))
        assert request_job_deletion(session=session, job_id=job_id) == 1

    totals = report(sessions)
    assert (totals["jobs"], totals["gpu_seconds"]) == (1, 0.0) and totals["lost_gpu_seconds"] == pytest.approx(2.0)
