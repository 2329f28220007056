"""What a worker notes when it claims a job (its log fields, its queue wait), and where it
installs its metrics.

One read of the claimed row gives both: the tenant (the message does not carry it) for
every log line about the job, and the time from submission (`queued_at`) to the claim
(`started_at`) for `ipab_queue_wait_seconds`. A failed read costs the job nothing: its lines
then lack the tenant and its wait goes unobserved.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from celery.signals import task_prerun, worker_process_init
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared.db import Batch, Job
from shared.logs import bind_job, bound_job, unbind_job
from worker import metrics

log = logging.getLogger(__name__)


class _Observing:
    """Whether anything reads what a claim notes (served metrics, JSON log lines)."""

    read_claims = True  # tests and `ipab generate` keep the default; `install` decides for a worker


def note_claim(sessions: sessionmaker[Session], *, job_id: str, attempt: int) -> dict[str, Any]:
    """Observe how long the claimed job waited; return its log fields, bound for the lines
    that follow unless a job is bound already (the first job of a pipeline call names it).

    The row is read only when served metrics or JSON logs will use it: a read per claim was
    a tenth of a job's control-plane cost (BENCHMARKS.md section 3)."""
    fields: dict[str, Any] = {"job_id": job_id, "attempt": attempt}
    row = _read_claimed(sessions, job_id) if _Observing.read_claims else None
    if row is not None:
        batch_id, tenant, queued_at, started_at = row
        fields.update(batch_id=batch_id, tenant=tenant)
        if queued_at is not None and started_at is not None:
            metrics.job_claimed((started_at - queued_at).total_seconds())
    if not bound_job():
        bind_job(**fields)
    return fields


def _read_claimed(
    sessions: sessionmaker[Session], job_id: str
) -> tuple[str, str, datetime | None, datetime | None] | None:
    query = (
        select(Job.batch_id, Batch.tenant, Job.queued_at, Job.started_at)
        .select_from(Job)
        .join(Batch, Batch.id == Job.batch_id)
    )
    try:
        with sessions() as session:
            row = session.execute(query.where(Job.id == job_id)).tuples().one_or_none()
            return None if row is None else (row[0], row[1], row[2], row[3])
    except Exception as e:  # noting a job must never fail it
        log.debug("job %s: tenant and queue wait not read: %s", job_id, e)
        return None


def install(*, model_set: str, metrics_port: int, json_logs: bool = False) -> None:
    """In a worker: each pool process builds its metrics (served on `metrics_port` unless 0),
    and each task starts with no job bound to its log lines."""
    _Observing.read_claims = bool(metrics_port) or json_logs
    worker_process_init.connect(lambda **_: metrics.install(model_set=model_set, port=metrics_port), weak=False)
    task_prerun.connect(lambda **_: unbind_job(), weak=False)
