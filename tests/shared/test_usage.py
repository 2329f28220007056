"""Metering in SQL: each job's usage is written by the transaction that ends it, with its rollup
row, once: a fenced-out attempt adds nothing billed, and its seconds are shown as lost."""

from __future__ import annotations

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.db import (
    Batch,
    Job,
    JobStatus,
    UsageRollup,
    ensure_database,
    insert_new_jobs,
    make_engine,
    make_session_factory,
    new_id,
    utcnow,
)
from shared.jobs import claim_job, expire_leases, fail_job, finish_job, record_left_attempt, renew_lease
from shared.usage import AttemptUsage
from tests.conftest import metered_result

PIXELS = 64 * 64
STEPS = 4


def _jobs(url: str, count: int, *, tenant: str = "acme", lane: str = "bulk") -> tuple[sessionmaker[Session], list[str]]:
    ensure_database(url)
    sessions = make_session_factory(make_engine(url))
    with sessions.begin() as session:
        batch = Batch(id=new_id(), name=f"b-{new_id()[:8]}", model_set="tiny", job_count=0, tenant=tenant)
        session.add(batch)
        session.flush()
        rows = [(new_id(), i, None, f"k{i}", "{}", i, lane) for i in range(count)]
        insert_new_jobs(session, batch_id=batch.id, queued_at=utcnow(), rows=rows)
    return sessions, [r[0] for r in rows]


def _claim(sessions: sessionmaker[Session], job_id: str, *, lease_s: float = 30.0) -> int:
    attempt = claim_job(sessions=sessions, job_id=job_id, worker_host="w", lease_s=lease_s, max_attempts=3)
    assert attempt is not None
    return attempt


def _row(sessions: sessionmaker[Session], job_id: str) -> Job:
    with sessions() as session:
        return session.scalars(select(Job).where(Job.id == job_id)).one()


def _rollup(sessions: sessionmaker[Session]) -> list[UsageRollup]:
    with sessions() as session:
        return list(session.scalars(select(UsageRollup)))


def _lose_lease(sessions: sessionmaker[Session], job_id: str) -> None:
    """The worker holding the job stops renewing: its lease is in the past."""
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow().replace(year=2000)))


def test_a_finished_job_records_its_usage_and_its_rollup_row_in_one_transaction(database_url: str) -> None:
    sessions, (job_id,) = _jobs(database_url, 1)
    attempt = _claim(sessions, job_id)
    assert renew_lease(sessions=sessions, job_id=job_id, attempt=attempt, lease_s=30, max_lease_s=300, gpu_s=0.4)
    assert _row(sessions, job_id).attempt_gpu_s == pytest.approx(0.4)

    assert finish_job(sessions=sessions, job_id=job_id, attempt=attempt, result=metered_result(1.5))

    job = _row(sessions, job_id)
    assert (job.gpu_s, job.lost_gpu_s, job.attempt_gpu_s) == (pytest.approx(1.5), 0.0, 0.0)
    assert (job.steps_run, job.pixel_steps) == (STEPS, PIXELS * STEPS)
    assert job.queue_s is not None and job.total_s is not None
    assert 0.0 <= job.queue_s <= job.total_s < 60.0
    (row,) = _rollup(sessions)
    assert (row.tenant, row.lane, row.model_set, row.day) == ("acme", "bulk", "tiny", job.finished_at.date())
    assert (row.jobs, row.images, row.pixel_steps) == (1, 1, PIXELS * STEPS)
    assert (row.gpu_s, row.lost_gpu_s) == (pytest.approx(1.5), 0.0)
    assert row.total_s == pytest.approx(job.total_s)


def test_a_duplicate_finish_adds_nothing_to_the_rollup(database_url: str) -> None:
    sessions, (job_id,) = _jobs(database_url, 1)
    attempt = _claim(sessions, job_id)
    assert finish_job(sessions=sessions, job_id=job_id, attempt=attempt, result=metered_result(1.0))
    assert not finish_job(sessions=sessions, job_id=job_id, attempt=attempt, result=metered_result(1.0))
    (row,) = _rollup(sessions)
    assert (row.jobs, row.images, row.gpu_s) == (1, 1, pytest.approx(1.0))


def test_a_lost_attempt_is_shown_as_lost_and_the_job_is_billed_once(database_url: str) -> None:
    sessions, (job_id,) = _jobs(database_url, 1)
    first = _claim(sessions, job_id, lease_s=30)
    # The first worker's heartbeat noted 0.7 s of rendering; then it stalled and its lease expired.
    assert renew_lease(sessions=sessions, job_id=job_id, attempt=first, lease_s=30, max_lease_s=300, gpu_s=0.7)
    _lose_lease(sessions, job_id)
    requeued, _ = expire_leases(sessions=sessions, max_attempts=3)
    assert requeued == [job_id]
    assert _row(sessions, job_id).lost_gpu_s == pytest.approx(0.7)
    second = _claim(sessions, job_id)
    assert finish_job(sessions=sessions, job_id=job_id, attempt=second, result=metered_result(2.0))
    # The stalled first attempt wakes up, finishes its render (1.2 s in all) and is fenced out.
    assert not finish_job(sessions=sessions, job_id=job_id, attempt=first, result=metered_result(1.2))
    usage = AttemptUsage(gpu_s=1.2, steps_run=STEPS, pixels=PIXELS)
    assert not record_left_attempt(sessions=sessions, job_id=job_id, attempt=first, usage=usage, reported_s=0.7)

    job = _row(sessions, job_id)
    assert (job.gpu_s, job.lost_gpu_s) == (pytest.approx(2.0), pytest.approx(1.2))
    (row,) = _rollup(sessions)
    assert (row.jobs, row.images, row.gpu_s, row.lost_gpu_s) == (1, 1, pytest.approx(2.0), pytest.approx(1.2))


def test_a_job_claimed_again_after_its_worker_died_counts_what_the_dead_one_reported(database_url: str) -> None:
    sessions, (job_id,) = _jobs(database_url, 1)
    first = _claim(sessions, job_id)
    assert renew_lease(sessions=sessions, job_id=job_id, attempt=first, lease_s=30, max_lease_s=300, gpu_s=0.3)
    _lose_lease(sessions, job_id)
    second = _claim(sessions, job_id)  # a duplicate delivery takes the expired lease directly
    assert second == first + 1
    assert finish_job(sessions=sessions, job_id=job_id, attempt=second, result=metered_result(1.0))
    job = _row(sessions, job_id)
    assert (job.gpu_s, job.lost_gpu_s, job.attempt_gpu_s) == (pytest.approx(1.0), pytest.approx(0.3), 0.0)


def test_a_failed_job_is_counted_with_its_seconds_lost_and_no_image(database_url: str) -> None:
    sessions, (job_id,) = _jobs(database_url, 1)
    attempt = _claim(sessions, job_id)
    assert fail_job(sessions=sessions, job_id=job_id, attempt=attempt, error_type="X", message="bad", gpu_s=0.9)
    job = _row(sessions, job_id)
    assert (job.status, job.gpu_s, job.lost_gpu_s) == (JobStatus.failed.value, None, pytest.approx(0.9))
    (row,) = _rollup(sessions)
    assert (row.jobs, row.images, row.gpu_s, row.lost_gpu_s) == (1, 0, 0.0, pytest.approx(0.9))


def test_a_job_whose_worker_is_lost_too_often_is_counted_when_the_reconciler_fails_it(database_url: str) -> None:
    sessions, (job_id,) = _jobs(database_url, 1)
    attempt = _claim(sessions, job_id)
    assert renew_lease(sessions=sessions, job_id=job_id, attempt=attempt, lease_s=30, max_lease_s=300, gpu_s=0.5)
    _lose_lease(sessions, job_id)
    _, failed = expire_leases(sessions=sessions, max_attempts=1)
    assert failed == [job_id]
    (row,) = _rollup(sessions)
    assert (row.jobs, row.images, row.lost_gpu_s) == (1, 0, pytest.approx(0.5))


def test_a_running_job_canceled_is_billed_the_steps_it_ran(database_url: str) -> None:
    sessions, (job_id,) = _jobs(database_url, 1)
    attempt = _claim(sessions, job_id)
    with sessions.begin() as session:  # what `ipab cancel` does to the row
        session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.canceled.value))
    usage = AttemptUsage(gpu_s=0.25, steps_run=2, pixels=PIXELS)
    assert record_left_attempt(sessions=sessions, job_id=job_id, attempt=attempt, usage=usage, reported_s=0.0)
    # Told twice (a retried report): counted once.
    assert not record_left_attempt(sessions=sessions, job_id=job_id, attempt=attempt, usage=usage, reported_s=0.25)
    job = _row(sessions, job_id)
    assert (job.gpu_s, job.steps_run, job.pixel_steps, job.lost_gpu_s) == (pytest.approx(0.25), 2, PIXELS * 2, 0.0)
    (row,) = _rollup(sessions)
    assert (row.jobs, row.images, row.gpu_s, row.pixel_steps) == (0, 0, pytest.approx(0.25), PIXELS * 2)


def test_rollup_rows_are_per_tenant_day_batch_and_lane(sqlite_url: str) -> None:
    sessions, ids = _jobs(sqlite_url, 3, lane="bulk")
    _, more = _jobs(sqlite_url, 2, tenant="globex", lane="interactive")
    for job_id in [*ids, *more]:
        attempt = _claim(sessions, job_id)
        assert finish_job(sessions=sessions, job_id=job_id, attempt=attempt, result=metered_result(0.5))
    rows = {(r.tenant, r.lane): (r.jobs, r.images, r.gpu_s) for r in _rollup(sessions)}
    assert rows == {("acme", "bulk"): (3, 3, pytest.approx(1.5)), ("globex", "interactive"): (2, 2, pytest.approx(1.0))}
