"""Recording a job's failure: permanent errors fail it, transient ones give it back.

Shared by the runner (errors while rendering) and the publisher (errors while uploading).
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session, sessionmaker

from shared.db import JobStatus
from shared.errors import IpabError, TransientError
from shared.jobs import fail_job, record_left_attempt, release_job
from shared.retry import retry_per_settings
from shared.settings import Settings
from shared.usage import AttemptUsage
from worker import metrics
from worker.lease import Lease

log = logging.getLogger(__name__)


def record_failure(
    settings: Settings,
    sessions: sessionmaker[Session],
    *,
    job_id: str,
    attempt: int,
    error: IpabError,
    gpu_s: float | None = None,
) -> str:
    """Permanent errors fail the job now; a transient fault that outlasted its retries gives
    the job back to the queue (failing it once its attempts are spent). Returns the outcome.

    `gpu_s`: the attempt's device seconds, counted as lost (not billed) either way."""
    kind, message = type(error).__name__, str(error)
    if isinstance(error, TransientError):

        def record() -> str:
            return release_job(
                sessions=sessions,
                job_id=job_id,
                attempt=attempt,
                max_attempts=settings.max_attempts,
                error_type=kind,
                message=message,
                gpu_s=gpu_s,
            )

    else:

        def record() -> str:
            ours = fail_job(
                sessions=sessions, job_id=job_id, attempt=attempt, error_type=kind, message=message, gpu_s=gpu_s
            )
            return JobStatus.failed.value if ours else ""

    outcome = retry_per_settings(record, what=f"record {kind} of {job_id}", settings=settings)
    log.warning("job %s: %s: %s -> %s", job_id, kind, message, outcome or "no longer ours")
    if outcome == JobStatus.failed.value:
        metrics.job_failed()
    return outcome or "skipped"


def record_left_job(settings: Settings, sessions: sessionmaker[Session], *, lease: Lease, usage: AttemptUsage) -> None:
    """An attempt whose lease was lost left its job unfinished: a canceled job is billed the steps
    it ran; a job taken over (or whose lease lapsed) counts the attempt as lost (`shared.jobs`).

    Best effort: a database that stays away loses this attempt's last seconds, nothing else."""
    try:
        billed = retry_per_settings(
            lambda: record_left_attempt(
                sessions=sessions,
                job_id=lease.job_id,
                attempt=lease.attempt,
                usage=usage,
                reported_s=lease.meter.reported_s,
            ),
            what=f"record the usage of {lease.job_id}",
            settings=settings,
        )
    except IpabError as e:
        log.warning("job %s: the usage of attempt %d was not recorded: %s", lease.job_id, lease.attempt, e)
        return
    log.info(
        "job %s attempt %d left at step %d after %.3f device seconds (%s)",
        lease.job_id,
        lease.attempt,
        usage.steps_run,
        usage.gpu_s,
        "canceled: billed" if billed else "lost: not billed",
    )
