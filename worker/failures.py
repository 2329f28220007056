"""Recording a job's failure: permanent errors fail it, transient ones give it back.

Shared by the runner (errors while rendering) and the publisher (errors while uploading).
"""

from __future__ import annotations

import logging

from sqlalchemy.orm import Session, sessionmaker

from shared.db import JobStatus
from shared.errors import IpabError, TransientError
from shared.jobs import fail_job, release_job
from shared.retry import retry_per_settings
from shared.settings import Settings
from worker import metrics

log = logging.getLogger(__name__)


def record_failure(
    settings: Settings, sessions: sessionmaker[Session], *, job_id: str, attempt: int, error: IpabError
) -> str:
    """Permanent errors fail the job now; a transient fault that outlasted its retries gives
    the job back to the queue (failing it once its attempts are spent). Returns the outcome."""
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
            )

    else:

        def record() -> str:
            ours = fail_job(sessions=sessions, job_id=job_id, attempt=attempt, error_type=kind, message=message)
            return JobStatus.failed.value if ours else ""

    outcome = retry_per_settings(record, what=f"record {kind} of {job_id}", settings=settings)
    log.warning("job %s: %s: %s -> %s", job_id, kind, message, outcome or "no longer ours")
    if outcome == JobStatus.failed.value:
        metrics.job_failed()
    return outcome or "skipped"
