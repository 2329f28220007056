"""What can be done to a live batch: cancel, retry, pause, resume; and waking its dispatcher.

Every status change is a conditional UPDATE (`... WHERE status IN (...)`), so it cannot move
a job that finished meanwhile. A cancel writes its `job.canceled` outbox rows in the same
transaction. Retry and resume wake the batch's dispatcher, which otherwise finds the jobs
within IPAB_DISPATCH_RESCAN_S (a wake is a hint: SQL stays the truth).

A whole batch is canceled `CANCEL_CHUNK` jobs per transaction (`cancel_batch`): one
transaction for 99,000 jobs held SQLite's write lock for 3.4 s (its UPDATE, its outbox rows,
its usage roll-up), and every other tenant's submissions and the webhook deliveries' writes
waited for it (measured, bench/two_tenants.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Final

import redis
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from scheduler.batches.events import outbox_job_events
from shared.db import Batch, Job, JobStatus, serialized_writes, utcnow
from shared.dispatch.dispatcher import wake_dispatcher
from shared.jobs import LIVE, expiry_on_finish, transaction
from shared.settings import Settings
from shared.usage import RESET_USAGE, roll_up_ended

ROLLUP_CHUNK: Final = 1000  # canceled job ids per roll-up statement
CANCEL_CHUNK: Final = 1000  # jobs per transaction of `cancel_batch`: some 30 ms of SQLite's write lock
CANCEL_PAUSE_S: Final = 0.005  # between two of them: the writers that waited go first


def cancel(*, session: Session, batch_id: str, job_ids: Sequence[str] | None = None) -> list[str]:
    """Cancel the live jobs of a batch (or only `job_ids`) with their `job.canceled` messages; returns their ids.

    Running jobs stop at their next denoising step (their worker sees the status at its heartbeat).
    """
    where = [Job.batch_id == batch_id, Job.status.in_(LIVE)]
    if job_ids is not None:
        where.append(Job.id.in_(list(job_ids)))
    stmt = (
        update(Job)
        .where(*where)
        .values(
            status=JobStatus.canceled.value, finished_at=utcnow(), expires_at=expiry_on_finish(), lease_expires_at=None
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    canceled = list(session.execute(stmt).scalars())
    if canceled:
        outbox_job_events(session=session, job_ids=canceled)
        # Counted as they end; a running one's steps come from its worker when it notices (shared.usage).
        for start in range(0, len(canceled), ROLLUP_CHUNK):
            roll_up_ended(session, Job.id.in_(canceled[start : start + ROLLUP_CHUNK]))
    return canceled


def cancel_batch(
    *, sessions: sessionmaker[Session], batch_id: str, chunk: int = CANCEL_CHUNK, pause_s: float = CANCEL_PAUSE_S
) -> int:
    """Cancel every live job of a batch, `chunk` jobs per transaction, each with its `job.canceled`
    messages and usage roll-up; returns how many it canceled.

    Between two transactions the write lock is free for a moment (`pause_s`; this process's other
    writers queue on `serialized_writes`, and take it first). So the cancel is not one snapshot:
    a reader in between sees the batch partly canceled, and a job the dispatcher hands to a worker
    meanwhile is canceled by a later chunk (it is live until then; it stops at its next step, as
    any canceled running job). When it returns, no job of the batch is live, as after `cancel`.
    One that fails part way (the database went away) leaves the jobs it did not reach live; asked
    again, it cancels those: a cancel converges, and each job's event is written once, with it.
    """
    live = (Job.batch_id == batch_id, Job.status.in_(LIVE))
    total = 0
    while True:
        started = time.monotonic()
        with serialized_writes(sessions), transaction(sessions) as session:
            ids = list(session.scalars(select(Job.id).where(*live).limit(chunk)))
            canceled = cancel(session=session, batch_id=batch_id, job_ids=ids) if ids else []
        total += len(canceled)
        if len(ids) < chunk:
            return total
        time.sleep(max(pause_s, time.monotonic() - started))


def retry_failed(*, sessions: sessionmaker[Session], batch_id: str) -> list[str]:
    """Put a batch's failed jobs back in the queue with a fresh budget of attempts; returns their ids.

    Not those whose data the janitor removed or whose deletion was asked for: their reference
    images may be gone, and they are going.
    """
    failed = (
        Job.batch_id == batch_id,
        Job.status == JobStatus.failed.value,
        Job.data_state.is_(None),
        Job.deleted_at.is_(None),
    )
    with transaction(sessions) as session:
        ids = list(session.scalars(select(Job.id).where(*failed)).all())
        if ids:
            session.execute(
                update(Job)
                .where(Job.id.in_(ids), *failed)
                .values(
                    status=JobStatus.queued.value,
                    attempt_floor=Job.attempts,
                    enqueued_at=None,
                    queued_at=utcnow(),
                    finished_at=None,
                    expires_at=None,
                    error_type=None,
                    error_message=None,
                    # A fresh run, metered afresh: the failed run's usage is in the rollup already.
                    **RESET_USAGE,
                )
                .execution_options(synchronize_session=False)
            )
        return ids


def set_paused(*, sessions: sessionmaker[Session], batch_id: str, paused: bool) -> int:
    """Pause or resume a batch; returns its queued jobs (which wait while it is paused)."""
    queued = (Job.batch_id == batch_id, Job.status == JobStatus.queued.value)
    with transaction(sessions) as session:
        session.execute(update(Batch).where(Batch.id == batch_id).values(paused=paused))
        return int(session.scalar(select(func.count()).select_from(Job).where(*queued)) or 0)


def wake(*, redis_client: redis.Redis, settings: Settings, model_set: str) -> bool:
    """Tell the model set's dispatcher to re-read SQL now; False when Redis does not answer (it rescans anyway)."""
    return wake_dispatcher(redis_client=redis_client, settings=settings, model_set=model_set)
