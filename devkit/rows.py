"""Rows as a submission leaves them, written straight to the database: for tests and benchmarks that
need a large batch without submitting a manifest of it."""

from __future__ import annotations

from sqlalchemy.orm import Session

from shared.db import Batch, insert_new_jobs, new_id, utcnow


def queued_batch(session: Session, *, tenant: str, jobs: int, model_set: str = "tiny", name: str = "big") -> str:
    """A batch of `jobs` queued jobs of `tenant` (prompt "p", seeds 0..jobs-1), in `session`; its id."""
    batch = Batch(id=new_id(), name=name, model_set=model_set, job_count=jobs, tenant=tenant)
    session.add(batch)
    session.flush()
    rows = [(new_id(), i, None, f"{i:064x}", '{"prompt": "p"}', i, "bulk") for i in range(jobs)]
    insert_new_jobs(session, batch_id=batch.id, queued_at=utcnow(), rows=rows)
    return batch.id
