"""Leases: the process's heartbeat renews every held lease, and stops at stop() or when the job is lost."""

from __future__ import annotations

import time
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.db import Batch, Job, ensure_database, insert_new_jobs, make_engine, make_session_factory, new_id, utcnow
from shared.jobs import cancel_jobs, claim_job
from worker.lease import Lease


def _expiry(sessions: sessionmaker[Session], job_id: str) -> datetime | None:
    with sessions() as session:
        value: datetime | None = session.scalar(select(Job.lease_expires_at).where(Job.id == job_id))
        return value


def test_two_held_leases_are_both_renewed_until_stopped_or_lost(sqlite_url: str) -> None:
    ensure_database(sqlite_url)
    sessions = make_session_factory(make_engine(sqlite_url))
    with sessions.begin() as session:
        batch = Batch(id=new_id(), name="b", model_set="m", job_count=0)
        session.add(batch)
        session.flush()
        rows = [(new_id(), i, None, f"k{i}", "{}", i) for i in range(3)]
        insert_new_jobs(session, batch_id=batch.id, queued_at=utcnow(), rows=rows)
    ids = [r[0] for r in rows]
    leases = []
    for job_id in ids:
        attempt = claim_job(sessions=sessions, job_id=job_id, worker_host="w", lease_s=5)
        assert attempt == 1
        leases.append(Lease(sessions=sessions, job_id=job_id, attempt=attempt, lease_s=5, heartbeat_s=0.2).start())
    first = {job_id: _expiry(sessions, job_id) for job_id in ids}
    leases[2].stop()
    cancel_jobs(sessions=sessions, batch_id=batch.id, job_ids=[ids[1]])
    time.sleep(1.0)
    after = {job_id: _expiry(sessions, job_id) for job_id in ids}
    assert after[ids[0]] > first[ids[0]]  # type: ignore[operator]  # renewed
    assert after[ids[2]] == first[ids[2]]  # stopped: never renewed
    assert leases[1].lost and not leases[0].lost and not leases[2].lost
    leases[0].stop()
