"""A job's statuses and the tenant of unowned work: the words that SQL rows, the CLI's choices
and the API share.

No storage import here (`shared.db` re-exports these), so that a command's parser can offer
the statuses as choices without loading SQLAlchemy.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Final

# The tenant of CLI submissions without `--tenant`, and of batches made before tenants existed.
DEFAULT_TENANT: Final = "default"


class JobStatus(StrEnum):
    """Where a job is in its life; stored as its value in `jobs.status`."""

    queued = "queued"  # committed; its message is (or will be, by the reconciler) in Redis
    running = "running"  # claimed by a worker holding a lease
    succeeded = "succeeded"  # output uploaded and recorded; final
    failed = "failed"  # permanent error or out of attempts; final (the dead-letter list)
    canceled = "canceled"  # canceled before or while running; final


TERMINAL: Final = frozenset({JobStatus.succeeded, JobStatus.failed, JobStatus.canceled})
STATUSES: Final = tuple(s.value for s in JobStatus)  # every status's value, in the order of their life
