"""What can be done to a live batch: cancel, retry, pause, resume; and waking its dispatcher.

Every status change is a conditional UPDATE (`... WHERE status IN (...)`), so it cannot move
a job that finished meanwhile. A cancel writes the `job.canceled` outbox rows of the queued jobs
it ends in the same transaction; a running one's waits for its worker's report of the steps it
ran (or for its lease to lapse: `shared.jobs.AWAITING_REPORT`), so that it carries what was
billed, and the webhook delivery loop's scan writes it then. Retry and resume wake the batch's
dispatcher, which otherwise finds the jobs within IPAB_DISPATCH_RESCAN_S (a wake is a hint: SQL
stays the truth).

A whole batch is canceled `CANCEL_CHUNK` jobs per transaction (`cancel_batch`): one
transaction for 99,000 jobs held SQLite's write lock for 3.4 s (its UPDATE, its outbox rows,
its usage roll-up), and every other tenant's submissions and the webhook deliveries' writes
waited for it (measured, bench/two_tenants.py).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Final, Protocol

import redis
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

from scheduler.batches.events import outbox_job_events
from scheduler.batches.limits import TenantCap, lock_tenant, refusal
from shared.db import Batch, Job, JobStatus, serialized_writes, utcnow
from shared.dispatch.dispatcher import wake_dispatcher
from shared.jobs import LIVE, expiry_on_finish, lease_on_cancel, transaction
from shared.settings import Settings
from shared.usage import RESET_USAGE, roll_up_ended

ROLLUP_CHUNK: Final = 1000  # canceled job ids per roll-up statement
CANCEL_CHUNK: Final = 1000  # jobs per transaction of `cancel_batch`: some 30 ms of SQLite's write lock
CANCEL_PAUSE_S: Final = 0.005  # between two of them: the writers that waited go first


def cancel(*, session: Session, batch_id: str, job_ids: Sequence[str] | None = None) -> list[str]:
    """Cancel the live jobs of a batch (or only `job_ids`) with their `job.canceled` messages; returns their ids.

    Running jobs stop at their next denoising step (their worker sees the status at its heartbeat);
    they keep their lease until their worker reports the steps it ran, and their message waits for
    that report (or the lease's end), to carry what was billed.
    """
    where = [Job.batch_id == batch_id, Job.status.in_(LIVE)]
    if job_ids is not None:
        where.append(Job.id.in_(list(job_ids)))
    stmt = (
        update(Job)
        .where(*where)
        .values(
            status=JobStatus.canceled.value,
            finished_at=utcnow(),
            expires_at=expiry_on_finish(),
            lease_expires_at=lease_on_cancel(),
        )
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    canceled = list(session.execute(stmt).scalars())
    if canceled:
        outbox_job_events(session=session, job_ids=canceled)  # the queued ones'; the running ones' wait
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


class AddingCheck(Protocol):
    """A check of the tenant's limits in the transaction that adds `adding` live jobs of `tenant`,
    under its lock: it raises (QuotaExceeded) when they may not be added. The faces pass
    `scheduler.usage.quotas.check_quotas`, which this layer cannot import (it sits above)."""

    def __call__(self, *, session: Session, tenant: str, adding: int) -> None: ...


def retry_failed(
    *, sessions: sessionmaker[Session], batch_id: str, within_quotas: AddingCheck, cap: TenantCap | None = None
) -> list[str]:
    """Put a batch's failed jobs back in the queue with a fresh budget of attempts; returns their ids.

    Not those whose data the janitor removed or whose deletion was asked for: their reference
    images may be gone, and they are going. A failed job gave its image back to the tenant's
    quota; queued again, it counts again: `within_quotas` refuses the retry, as a whole, when
    the jobs would pass a quota (nothing is re-queued then), as it refuses a submission. So does
    `cap` (the API's queued-jobs cap), with CapReached: queued again, they count again there too.
    """
    failed = (
        Job.batch_id == batch_id,
        Job.status == JobStatus.failed.value,
        Job.data_state.is_(None),
        Job.deleted_at.is_(None),
    )
    with serialized_writes(sessions), transaction(sessions) as session:
        tenant = session.scalar(select(Batch.tenant).where(Batch.id == batch_id))
        if tenant is None:
            return []
        # The tenant's lock first: a concurrent retry or submission waits, and the jobs read next stay failed.
        lock_tenant(session=session, tenant=tenant)
        ids = list(session.scalars(select(Job.id).where(*failed)).all())
        if ids:
            if cap is not None and (held := cap.count(session, tenant)) + len(ids) > cap.maximum:
                raise refusal(tenant=tenant, cap=cap, held=held, adding=len(ids))
            within_quotas(session=session, tenant=tenant, adding=len(ids))
            _requeue(session, ids, failed)
        return ids


def _requeue(session: Session, ids: list[str], failed: tuple[Any, ...]) -> None:
    """The failed jobs `ids` queued afresh: a fresh budget of attempts, no expiry, usage reset."""
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


def set_paused(*, sessions: sessionmaker[Session], batch_id: str, paused: bool) -> int:
    """Pause or resume a batch; returns its queued jobs (which wait while it is paused)."""
    queued = (Job.batch_id == batch_id, Job.status == JobStatus.queued.value)
    with transaction(sessions) as session:
        session.execute(update(Batch).where(Batch.id == batch_id).values(paused=paused))
        return int(session.scalar(select(func.count()).select_from(Job).where(*queued)) or 0)


def wake(*, redis_client: redis.Redis, settings: Settings, model_set: str) -> bool:
    """Tell the model set's dispatcher to re-read SQL now; False when Redis does not answer (it rescans anyway)."""
    return wake_dispatcher(redis_client=redis_client, settings=settings, model_set=model_set)
