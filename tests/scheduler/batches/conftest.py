"""The API's fixtures (an in-process app on the test's services, tenants with keys), for batch-layer tests;
and a batch of jobs in every state, which the chunked cancel and deletion tests share."""

from __future__ import annotations

import uuid
from typing import Any

from sqlalchemy import insert
from sqlalchemy.orm import Session

from shared.db import Batch, Job, JobStatus, utcnow
from tests.scheduler.api.conftest import alice, api_settings, client

__all__ = ["alice", "api_settings", "client", "insert_mixed_batch"]


def insert_mixed_batch(
    session: Session, batch_id: str, *, name: str, jobs: int, finished: int, running: int, **fields: Any
) -> list[dict[str, Any]]:
    """Tenant t's batch of `jobs` jobs: the first `finished` succeeded, the next `running` running, the rest
    queued, each row with `fields` too (spec "{}" unless given); the rows inserted."""
    now = utcnow()
    session.add(Batch(id=batch_id, name=name, model_set="m", tenant="t", created_at=now, job_count=jobs))
    session.flush()
    rows = []
    for i in range(jobs):
        status = JobStatus.succeeded if i < finished else JobStatus.running if i < finished + running else None
        row: dict[str, Any] = {
            "id": f"{batch_id}-{i:03d}",
            "batch_id": batch_id,
            "line": i,
            "dedupe_key": uuid.uuid4().hex,
            "spec": "{}",
            "seed": i,
            "queued_at": now,
            "status": (status or JobStatus.queued).value,
            **fields,
        }
        if status is JobStatus.succeeded:
            row["finished_at"] = now
        rows.append(row)
    session.execute(insert(Job), rows)
    return rows
