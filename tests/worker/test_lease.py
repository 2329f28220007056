"""Leases: renewed by the process's heartbeat until stopped, lost or past their maximum lifetime;
measured by the database server's clock, so hosts with skewed clocks agree on them."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta

import pytest
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shared import db
from shared.db import Batch, Job, ensure_database, insert_new_jobs, make_engine, make_session_factory, new_id, utcnow
from shared.jobs import claim_job, expire_leases, renew_lease
from tests.worker.conftest import cancel_jobs
from worker.lease import Lease

SKEW = timedelta(minutes=10)


def _expiry(sessions: sessionmaker[Session], job_id: str) -> datetime | None:
    with sessions() as session:
        value: datetime | None = session.scalar(select(Job.lease_expires_at).where(Job.id == job_id))
        return value


def _queued_jobs(url: str, count: int) -> tuple[sessionmaker[Session], str, list[str]]:
    ensure_database(url)
    sessions = make_session_factory(make_engine(url))
    with sessions.begin() as session:
        batch = Batch(id=new_id(), name="b", model_set="m", job_count=0)
        session.add(batch)
        session.flush()
        rows = [(new_id(), i, None, f"k{i}", "{}", i, "bulk") for i in range(count)]
        insert_new_jobs(session, batch_id=batch.id, queued_at=utcnow(), rows=rows)
    return sessions, batch.id, [r[0] for r in rows]


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[timedelta], None]]:
    """`clock(offset)` sets this process's Python-side UTC clock (what a skewed host reads)."""
    real = db.utcnow

    def set_offset(offset: timedelta) -> None:
        for module in (db,):
            monkeypatch.setattr(module, "utcnow", lambda: real() + offset)

    yield set_offset


def test_two_held_leases_are_both_renewed_until_stopped_or_lost(sqlite_url: str) -> None:
    sessions, batch_id, ids = _queued_jobs(sqlite_url, 3)
    leases = []
    for job_id in ids:
        attempt = claim_job(sessions=sessions, job_id=job_id, worker_host="w", lease_s=5, max_attempts=3)
        assert attempt == 1
        leases.append(
            Lease(sessions=sessions, job_id=job_id, attempt=attempt, lease_s=5, heartbeat_s=0.2, max_lease_s=60).start()
        )
    first = {job_id: _expiry(sessions, job_id) for job_id in ids}
    leases[2].stop()
    cancel_jobs(sessions=sessions, batch_id=batch_id, job_ids=[ids[1]])
    time.sleep(1.0)
    after = {job_id: _expiry(sessions, job_id) for job_id in ids}
    assert after[ids[0]] > first[ids[0]]  # type: ignore[operator]  # renewed
    assert after[ids[2]] == first[ids[2]]  # stopped: never renewed
    assert leases[1].lost and not leases[0].lost and not leases[2].lost
    leases[0].stop()


def test_skewed_worker_and_reconciler_clocks_neither_requeue_a_healthy_job_nor_keep_a_dead_one(
    database_url: str, clock: Callable[[timedelta], None]
) -> None:
    sessions, _, (healthy, dead) = _queued_jobs(database_url, 2)
    # A worker whose clock is 10 minutes slow claims and renews a job it keeps running...
    clock(-SKEW)
    assert claim_job(sessions=sessions, job_id=healthy, worker_host="slow", lease_s=30, max_attempts=3) == 1
    assert renew_lease(sessions=sessions, job_id=healthy, attempt=1, lease_s=30, max_lease_s=600)
    # ...and one whose clock is 10 minutes fast claims a job, then dies.
    clock(SKEW)
    assert claim_job(sessions=sessions, job_id=dead, worker_host="fast", lease_s=0.5, max_attempts=3) == 1
    time.sleep(1.0)
    # A reconciler 10 minutes fast must not take the healthy job away; one 10 minutes slow
    # must still see the dead one's lease expired.
    assert expire_leases(sessions=sessions, max_attempts=3) == ([dead], [])
    clock(-SKEW)
    assert expire_leases(sessions=sessions, max_attempts=3) == ([], [])
    with sessions() as session:
        assert session.scalar(select(Job.status).where(Job.id == healthy)) == "running"


def test_a_lease_is_never_renewed_past_its_maximum_lifetime(database_url: str) -> None:
    sessions, _, (job_id,) = _queued_jobs(database_url, 1)
    assert claim_job(sessions=sessions, job_id=job_id, worker_host="w", lease_s=30, max_attempts=3) == 1
    lease = Lease(sessions=sessions, job_id=job_id, attempt=1, lease_s=30, heartbeat_s=0.2, max_lease_s=1.0).start()
    time.sleep(0.5)
    assert not lease.lost
    time.sleep(1.5)
    assert lease.lost  # the database refused the renewal: the job is no longer ours
    frozen = _expiry(sessions, job_id)
    time.sleep(0.5)
    assert _expiry(sessions, job_id) == frozen
    lease.stop()


def test_a_job_whose_attempts_are_spent_is_not_claimed_again(database_url: str) -> None:
    sessions, _, (job_id,) = _queued_jobs(database_url, 1)
    with sessions.begin() as session:  # three workers lost it; the reconciler has not run yet
        lapsed = datetime(2000, 1, 1)
        session.execute(
            update(Job).where(Job.id == job_id).values(status="running", attempts=3, lease_expires_at=lapsed)
        )
    assert claim_job(sessions=sessions, job_id=job_id, worker_host="w", lease_s=5, max_attempts=3) is None
    assert claim_job(sessions=sessions, job_id=job_id, worker_host="w", lease_s=5, max_attempts=4) == 4


class _Unreachable:
    """A session factory whose database is down."""

    def begin(self) -> Session:
        raise OperationalError("BEGIN", {}, ConnectionRefusedError("connection refused"))


def test_a_failing_renewal_keeps_the_lease_only_until_its_own_expiry() -> None:
    lease = Lease(sessions=_Unreachable(), job_id="j", attempt=1, lease_s=0.5, heartbeat_s=0.1, max_lease_s=60)  # type: ignore[arg-type]
    assert lease.renew() and lease.held and not lease.lost  # within the lease: still ours
    time.sleep(0.6)
    assert not lease.renew()
    assert lease.lost and not lease.held
