"""Job state transitions in SQL: every one a conditional update, so replays change nothing.

The attempt number is the fencing token: each claim increments `attempts`, and a worker
may renew its lease or record a result only while `attempts` still equals the attempt it
claimed. A zombie attempt (its lease expired, the job re-claimed) cannot overwrite a
newer one, and a duplicate delivery of a finished or canceled job does nothing.

Lease times (claim, renew, expire, finish) are computed by the database server's clock
(`shared.db_clock.server_now`), never a worker's or the reconciler's: hosts whose clocks
disagree still agree on which leases are alive. A lease is renewed at most `max_lease_s`
after its claim (`lease_max_s` in `shared.settings`), so a job whose lease a leaked
heartbeat keeps renewing still expires.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

from sqlalchemy import Float, Table, and_, bindparam, exists, or_, select, update
from sqlalchemy.exc import InterfaceError as SqlInterfaceError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker

from shared.db import Batch, Job, JobStatus
from shared.db_clock import server_now
from shared.errors import DatabaseUnavailable

LIVE = (JobStatus.queued.value, JobStatus.running.value)


@dataclass(frozen=True)
class JobResult:
    """What a succeeded job records: where its PNG is, what it is, how long each step took."""

    output_key: str
    output_sha256: str
    output_bytes: int
    encode_s: float
    denoise_s: float
    upload_s: float
    cache_stats: str | None = None
    provenance: str | None = None  # JSON: weight sha256s, library versions, device, dtype (worker.provenance)
    render_batch_size: int | None = None  # jobs in the pipeline call that rendered this one


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """One committed transaction; an unreachable database becomes `DatabaseUnavailable`."""
    try:
        with sessions.begin() as session:
            yield session
    except (OperationalError, SqlInterfaceError) as e:
        raise DatabaseUnavailable(f"SQL database unreachable: {e.orig or e}") from e


# The hot statements (every job runs claim and finish; long jobs renew) are Core UPDATEs on
# the table, built once with bound parameters: building and compiling an ORM-enabled
# UPDATE per call cost a worker more CPU than the database spent running it.
_JOBS = cast(Table, Job.__table__)
_BATCHES = cast(Table, Batch.__table__)
_C = _JOBS.c
_FENCE = and_(_C.id == bindparam("p_id"), _C.attempts == bindparam("p_attempt"), _C.status == JobStatus.running.value)
_LEASE_S = bindparam("p_lease_s", type_=Float())
_CLAIM = (
    update(_JOBS)
    .where(
        _C.id == bindparam("p_id"),
        or_(
            _C.status == JobStatus.queued.value,
            and_(_C.status == JobStatus.running.value, _C.lease_expires_at < server_now()),
        ),
        # A job whose attempts are spent is not run again; the reconciler fails it.
        _C.attempts - _C.attempt_floor < bindparam("p_max_attempts"),
        # A paused batch's queued jobs do not start, even if their message was already in Redis.
        ~exists().where(_BATCHES.c.id == _C.batch_id, _BATCHES.c.paused.is_(True)),
    )
    .values(
        status=JobStatus.running.value,
        attempts=_C.attempts + 1,
        lease_expires_at=server_now(_LEASE_S),
        worker_host=bindparam("p_host"),
        started_at=server_now(),
    )
    .returning(_C.attempts)
)
_RENEW = (
    update(_JOBS)
    # Never past the lease's maximum lifetime, counted from its claim.
    .where(_FENCE, _C.started_at > server_now(-bindparam("p_max_lease_s", type_=Float())))
    .values(lease_expires_at=server_now(_LEASE_S))
)
_RESULT_FIELDS = (
    "output_key",
    "output_sha256",
    "output_bytes",
    "encode_s",
    "denoise_s",
    "upload_s",
    "cache_stats",
    "provenance",
    "render_batch_size",
)
_FINISH = (
    update(_JOBS)
    .where(_FENCE)
    .values(
        status=JobStatus.succeeded.value,
        finished_at=server_now(),
        lease_expires_at=None,
        error_type=None,
        error_message=None,
        **{name: bindparam(f"p_{name}") for name in _RESULT_FIELDS},
    )
)


def claim_job(
    *, sessions: sessionmaker[Session], job_id: str, worker_host: str, lease_s: float, max_attempts: int
) -> int | None:
    """Take a queued job (or one whose lease expired) with attempts left; return its attempt number, or None."""
    params = {"p_id": job_id, "p_lease_s": lease_s, "p_host": worker_host, "p_max_attempts": max_attempts}
    with transaction(sessions) as session:
        attempt: int | None = session.execute(_CLAIM, params).scalar_one_or_none()
        return attempt


def _update() -> Any:
    """An UPDATE of jobs that leaves the session's objects alone: nothing reads them after,
    and synchronizing them was a quarter of a claim's CPU time."""
    return update(Job).execution_options(synchronize_session=False)


def _changed(result: Any) -> int:
    """Rows an UPDATE changed (typed loosely by SQLAlchemy)."""
    return int(result.rowcount)


def _fenced(job_id: str, attempt: int) -> Any:
    return and_(Job.id == job_id, Job.attempts == attempt, Job.status == JobStatus.running.value)


def renew_lease(
    *, sessions: sessionmaker[Session], job_id: str, attempt: int, lease_s: float, max_lease_s: float
) -> bool:
    """Extend a running job's lease to `lease_s` from now (server time); False when the job was
    canceled or taken over, or its claim is more than `max_lease_s` old (the lease's maximum lifetime)."""
    params = {"p_id": job_id, "p_attempt": attempt, "p_lease_s": lease_s, "p_max_lease_s": max_lease_s}
    with transaction(sessions) as session:
        return _changed(session.execute(_RENEW, params)) == 1


def finish_job(*, sessions: sessionmaker[Session], job_id: str, attempt: int, result: JobResult) -> bool:
    """Mark the job succeeded, only if this attempt still holds it."""
    params: dict[str, Any] = {"p_id": job_id, "p_attempt": attempt}
    params.update({f"p_{name}": getattr(result, name) for name in _RESULT_FIELDS})
    with transaction(sessions) as session:
        return _changed(session.execute(_FINISH, params)) == 1


def fail_job(
    *, sessions: sessionmaker[Session], job_id: str, attempt: int | None, error_type: str, message: str
) -> bool:
    """Mark a job failed with its reason; fenced by attempt when one is given."""
    where = _fenced(job_id, attempt) if attempt is not None else and_(Job.id == job_id, Job.status.in_(LIVE))
    stmt = (
        _update()
        .where(where)
        .values(
            status=JobStatus.failed.value,
            finished_at=server_now(),
            lease_expires_at=None,
            error_type=error_type,
            error_message=message[:2000],
        )
    )
    with transaction(sessions) as session:
        return _changed(session.execute(stmt)) == 1


def release_job(
    *, sessions: sessionmaker[Session], job_id: str, attempt: int, max_attempts: int, error_type: str, message: str
) -> str:
    """Give a job back after a transient fault outlasted its retries: queued again, or failed
    once its attempts are spent. Returns the new status ("" if this attempt no longer holds it).
    """
    with transaction(sessions) as session:
        job = session.execute(select(Job.attempts, Job.attempt_floor).where(_fenced(job_id, attempt))).one_or_none()
        if job is None:
            return ""
        if job.attempts - job.attempt_floor >= max_attempts:
            values: dict[str, Any] = {
                "status": JobStatus.failed.value,
                "finished_at": server_now(),
                "error_type": error_type,
                "error_message": f"{message[:1800]} (after {max_attempts} attempts)",
            }
        else:
            values = {"status": JobStatus.queued.value, "enqueued_at": None, "worker_host": None}
        session.execute(_update().where(_fenced(job_id, attempt)).values(lease_expires_at=None, **values))
        return str(values["status"])


def expire_leases(*, sessions: sessionmaker[Session], max_attempts: int) -> tuple[list[str], list[str]]:
    """Jobs whose worker stopped renewing: back to queued, or failed after `max_attempts`.

    Returns (requeued ids, failed ids).
    """
    now = server_now()
    expired = and_(Job.status == JobStatus.running.value, Job.lease_expires_at < now)
    spent = (Job.attempts - Job.attempt_floor) >= max_attempts
    with transaction(sessions) as session:
        failed = list(session.scalars(select(Job.id).where(expired, spent)).all())
        requeued = list(session.scalars(select(Job.id).where(expired, ~spent)).all())
        if failed:
            session.execute(
                _update()
                .where(Job.id.in_(failed), expired)
                .values(
                    status=JobStatus.failed.value,
                    finished_at=now,
                    lease_expires_at=None,
                    error_type="WorkerLost",
                    error_message=f"worker lost {max_attempts} times",
                )
            )
        if requeued:
            session.execute(
                _update()
                .where(Job.id.in_(requeued), expired)
                .values(status=JobStatus.queued.value, lease_expires_at=None, enqueued_at=None)
            )
    return requeued, failed


def hand_back_paused(*, sessions: sessionmaker[Session], job_id: str) -> bool:
    """A delivered job of a paused batch goes back to waiting for dispatch (its message is gone)."""
    paused = select(Batch.id).where(Batch.id == Job.batch_id, Batch.paused.is_(True)).exists()
    stmt = _update().where(Job.id == job_id, Job.status == JobStatus.queued.value, paused).values(enqueued_at=None)
    with transaction(sessions) as session:
        return _changed(session.execute(stmt)) == 1


def undispatch(*, sessions: sessionmaker[Session], job_ids: Sequence[str]) -> set[str]:
    """Queued jobs whose message was lost wait for the dispatcher again; returns those changed."""
    changed: set[str] = set()
    for start in range(0, len(job_ids), 1000):
        chunk = list(job_ids[start : start + 1000])
        stmt = (
            update(Job)
            .where(Job.id.in_(chunk), Job.status == JobStatus.queued.value, Job.enqueued_at.is_not(None))
            .values(enqueued_at=None)
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        )
        with transaction(sessions) as session:
            changed.update(session.scalars(stmt))
    return changed
