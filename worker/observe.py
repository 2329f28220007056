"""What a worker notes when it claims a job (its log fields, its queue wait), and where it
installs its metrics.

The claim returns both (`shared.jobs.Claim`): the tenant (the message does not carry it) for
every log line about the job, and the time from submission (`queued_at`) to the claim
(`started_at`) for `ipab_queue_wait_seconds`. A read of the row after the claim was three
more round trips to the central database per job (BEGIN, SELECT, ROLLBACK) wherever metrics or
JSON logs were on.
"""

from __future__ import annotations

from typing import Any

from celery.signals import task_prerun, worker_process_init

from shared.jobs import Claim
from shared.logs import bind_job, bound_job, unbind_job
from worker import metrics


def note_claim(*, job_id: str, attempt: int, claim: Claim | None = None) -> dict[str, Any]:
    """Observe how long the claimed job waited (when its `claim` is known); return its log fields,
    bound for the lines that follow unless a job is bound already (the first job of a pipeline call
    names it)."""
    fields: dict[str, Any] = {"job_id": job_id, "attempt": attempt}
    if claim is not None:
        fields.update(batch_id=claim.batch_id, tenant=claim.tenant)
        metrics.job_claimed((claim.started_at - claim.queued_at).total_seconds())
    if not bound_job():
        bind_job(**fields)
    return fields


def install(*, model_set: str, metrics_port: int) -> None:
    """In a worker: each pool process builds its metrics (served on `metrics_port` unless 0),
    and each task starts with no job bound to its log lines."""
    worker_process_init.connect(lambda **_: metrics.install(model_set=model_set, port=metrics_port), weak=False)
    task_prerun.connect(lambda **_: unbind_job(), weak=False)
