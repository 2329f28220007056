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

import functools
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, cast

from sqlalchemy import (
    ColumnElement,
    Connection,
    Engine,
    Float,
    Table,
    and_,
    bindparam,
    case,
    exists,
    func,
    null,
    or_,
    select,
    update,
)
from sqlalchemy.exc import InterfaceError as SqlInterfaceError
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.functions import coalesce

from shared.db import TERMINAL, Batch, Job, JobStatus
from shared.db_clock import elapsed_s, server_now
from shared.errors import DatabaseUnavailable
from shared.usage import AttemptUsage, finish_and_roll_up, roll_up_ended, roll_up_job, roll_up_late

LIVE = (JobStatus.queued.value, JobStatus.running.value)
_ENDED = frozenset(s.value for s in TERMINAL)


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
    # Metering (shared/usage.py): this attempt's device seconds (its share of each pipeline call),
    # the denoising steps it ran, and width x height x steps.
    gpu_s: float | None = None
    steps_run: int | None = None
    pixel_steps: int | None = None


@dataclass(frozen=True)
class Claim:
    """A claimed attempt: its number (the fence), and what its worker notes about the job (its log
    lines' batch and tenant, its wait from submission to this claim), returned by the claim itself."""

    attempt: int
    batch_id: str
    tenant: str
    queued_at: datetime
    started_at: datetime


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """One committed transaction; an unreachable database becomes `DatabaseUnavailable`."""
    try:
        with sessions.begin() as session:
            yield session
    except (OperationalError, SqlInterfaceError) as e:
        raise DatabaseUnavailable(f"SQL database unreachable: {e.orig or e}") from e


def dialect_of(sessions: sessionmaker[Session]) -> str:
    """The name of the sessions' database dialect (`postgresql`, `sqlite`), "" when they have no engine."""
    engine = sessions.kw.get("bind")
    return engine.dialect.name if isinstance(engine, Engine) else ""


@contextmanager
def autocommit(sessions: sessionmaker[Session]) -> Iterator[Session | Connection]:
    """Where to run statements that each stand alone (each is atomic, its WHERE its fence): on
    PostgreSQL a connection in autocommit, where each is its own transaction and as durable,
    without the BEGIN and COMMIT round trips around it (a fifth of the server's CPU for a
    claim or a finish, bench/job_cost.py); elsewhere one `transaction` for them all.
    """
    engine = sessions.kw.get("bind")
    if not isinstance(engine, Engine) or engine.dialect.name != "postgresql":
        with transaction(sessions) as session:
            yield session
        return
    try:
        with engine.connect() as connection:
            yield connection.execution_options(isolation_level="AUTOCOMMIT")  # until it goes back to the pool
    except (OperationalError, SqlInterfaceError) as e:
        raise DatabaseUnavailable(f"SQL database unreachable: {e.orig or e}") from e


# The hot statements (every job runs claim and finish; long jobs renew) are Core UPDATEs on
# the table, built once with bound parameters: building and compiling an ORM-enabled
# UPDATE per call cost a worker more CPU than the database spent running it.
_JOBS = cast(Table, Job.__table__)
_BATCHES = cast(Table, Batch.__table__)
_C = _JOBS.c


def row_status() -> ColumnElement[str]:
    """A row's status as an expression that no index serves (`status || ''`), for statements that
    name their jobs by id: those must find them by the primary key. On the bare column, a planner
    whose statistics are older than the table's rows (a young database, or an ANALYZE taken while
    nothing ran) rates the status index as good as the key, picks it, and walks every queued or
    running entry, dead ones too, for each claim, finish and dispatch mark: in a profile of
    bench.control_plane a finish then cost PostgreSQL 5-7x its own work
    (tests/shared/test_lookups_by_key.py)."""
    return _C.status.concat("")


def expiry_on_finish() -> Any:
    """`jobs.expires_at` of a job that reaches a final status now: its retention from now (the
    server's clock; NULL when kept for ever). A job whose deletion was asked for keeps the
    expiry its deletion gave it: it finished, and goes at once."""
    return case(
        (_C.deleted_at.is_not(None), _C.expires_at),
        (_C.expires_after_s.is_(None), null()),
        else_=server_now(_C.expires_after_s),
    )


# A canceled job whose worker still holds its lease: the steps it ran are billed when that worker
# reports them (`record_left_attempt`), or nothing once the lease lapses unreported (`expire_leases`).
# Its `job.canceled` event waits until then (`scheduler.batches.events`), so that it carries what was billed.
AWAITING_REPORT: Final = and_(_C.status == JobStatus.canceled.value, _C.lease_expires_at.is_not(None))


def lease_on_cancel() -> Any:
    """`jobs.lease_expires_at` of a job a cancel ends: a running one keeps its lease, to wait for its
    worker's report of the steps it ran (AWAITING_REPORT); a queued one has none."""
    return case((_C.status == JobStatus.running.value, _C.lease_expires_at), else_=null())


_FENCE = and_(
    _C.id == bindparam("p_id"), _C.attempts == bindparam("p_attempt"), row_status() == JobStatus.running.value
)
_LEASE_S = bindparam("p_lease_s", type_=Float())
_CLAIM = (
    update(_JOBS)
    .where(
        _C.id == bindparam("p_id"),
        or_(
            row_status() == JobStatus.queued.value,
            and_(row_status() == JobStatus.running.value, _C.lease_expires_at < server_now()),
        ),
        # A job whose attempts are spent is not run again; the reconciler fails it.
        _C.attempts - _C.attempt_floor < bindparam("p_max_attempts"),
        # A paused batch's queued jobs do not start, even if their message was already in Redis; nor
        # do a deleted batch's (its deletion marks them in chunks), nor a deleted job whose lease lapsed.
        _C.deleted_at.is_(None),
        ~exists().where(
            _BATCHES.c.id == _C.batch_id, or_(_BATCHES.c.paused.is_(True), _BATCHES.c.deleted_at.is_not(None))
        ),
    )
    .values(
        status=JobStatus.running.value,
        attempts=_C.attempts + 1,
        lease_expires_at=server_now(_LEASE_S),
        worker_host=bindparam("p_host"),
        started_at=server_now(),
        # The previous attempt was lost (its worker died or stalled): what it reported is not billed.
        lost_gpu_s=_C.lost_gpu_s + _C.attempt_gpu_s,
        attempt_gpu_s=0.0,
    )
    # What the worker notes about the job it claimed comes back with the claim: a read of the row
    # after it (BEGIN, SELECT, ROLLBACK) cost the central database more than the claim and the finish
    # together, for every job, wherever a worker serves metrics or writes JSON logs (deploy/kubernetes
    # does both; bench/control_plane.py).
    .returning(
        _C.attempts,
        _C.batch_id,
        select(_BATCHES.c.tenant).where(_BATCHES.c.id == _C.batch_id).scalar_subquery(),
        _C.queued_at,
        _C.started_at,
    )
)
_RENEW = (
    update(_JOBS)
    # Never past the lease's maximum lifetime, counted from its claim.
    .where(_FENCE, _C.started_at > server_now(-bindparam("p_max_lease_s", type_=Float())))
    .values(
        lease_expires_at=server_now(_LEASE_S),
        # The attempt's device seconds so far: what it lost if it never reports again.
        attempt_gpu_s=coalesce(bindparam("p_gpu_s", type_=Float()), _C.attempt_gpu_s),
    )
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
    "gpu_s",
    "steps_run",
    "pixel_steps",
)
_FINISH = (
    update(_JOBS)
    .where(_FENCE)
    .values(
        status=JobStatus.succeeded.value,
        finished_at=server_now(),
        expires_at=expiry_on_finish(),
        lease_expires_at=None,
        error_type=None,
        error_message=None,
        **{name: bindparam(f"p_{name}") for name in _RESULT_FIELDS},
        attempt_gpu_s=0.0,
        queue_s=elapsed_s(_C.queued_at, _C.started_at),
        total_s=elapsed_s(_C.queued_at, server_now()),
    )
)


# PostgreSQL: a statement that commits without waiting for its WAL flush (`synchronous_commit` off
# for its transaction alone). `set_config(..., true)` is SET LOCAL as a function: in autocommit the
# statement is its own transaction, so the setting ends with it, with no BEGIN, SET, COMMIT round trips.
ASYNC_COMMIT: Final = select(func.set_config("synchronous_commit", "off", True)).scalar_subquery()
_CLAIM_ASYNC: Final = _CLAIM.where(ASYNC_COMMIT.is_not(None))


def claim(
    *, sessions: sessionmaker[Session], job_id: str, worker_host: str, lease_s: float, max_attempts: int
) -> Claim | None:
    """Take a queued job (or one whose lease expired) with attempts left; None when it is not ours to run.

    On PostgreSQL the claim's commit does not wait for its WAL flush: the flush was the larger part
    of the server's CPU for a claim. What a crash of the database can lose is then only claims no
    later commit flushed (WAL is flushed in order: the attempt's finish, a renewal, a cancel flush
    it). Such a job is back to `queued` with its attempt not counted, and the reconciler hands it
    back to run again. Its first worker's finish, fenced on the attempt number, then finds it not
    running and changes nothing, or stands for the new claim of the same number, whose own finish
    then changes nothing: one success either way, as with a worker that stalled past its lease.
    Nothing is lost and nothing succeeds twice (tests/system/test_chaos.py kills PostgreSQL mid-batch).
    """
    params = {"p_id": job_id, "p_lease_s": lease_s, "p_host": worker_host, "p_max_attempts": max_attempts}
    stmt = _CLAIM_ASYNC if dialect_of(sessions) == "postgresql" else _CLAIM
    with autocommit(sessions) as session:
        row = session.execute(stmt, params).one_or_none()
    if row is None:
        return None
    attempt, batch_id, tenant, queued_at, started_at = row
    return Claim(attempt=attempt, batch_id=batch_id, tenant=tenant, queued_at=queued_at, started_at=started_at)


def claim_job(
    *, sessions: sessionmaker[Session], job_id: str, worker_host: str, lease_s: float, max_attempts: int
) -> int | None:
    """`claim`'s attempt number alone, or None."""
    claimed = claim(
        sessions=sessions, job_id=job_id, worker_host=worker_host, lease_s=lease_s, max_attempts=max_attempts
    )
    return None if claimed is None else claimed.attempt


def _update() -> Any:
    """An UPDATE of jobs that leaves the session's objects alone: nothing reads them after,
    and synchronizing them was a quarter of a claim's CPU time."""
    return update(Job).execution_options(synchronize_session=False)


def _changed(result: Any) -> int:
    """Rows an UPDATE changed (typed loosely by SQLAlchemy)."""
    return int(result.rowcount)


def _fenced(job_id: str, attempt: int) -> Any:
    return and_(Job.id == job_id, Job.attempts == attempt, row_status() == JobStatus.running.value)


def renew_lease(
    *,
    sessions: sessionmaker[Session],
    job_id: str,
    attempt: int,
    lease_s: float,
    max_lease_s: float,
    gpu_s: float | None = None,
) -> bool:
    """Extend a running job's lease to `lease_s` from now (server time); False when the job was
    canceled or taken over, or its claim is more than `max_lease_s` old (the lease's maximum lifetime).

    `gpu_s`: the attempt's device seconds so far, noted as `attempt_gpu_s` (what is lost if it
    is never heard of again)."""
    params = {
        "p_id": job_id,
        "p_attempt": attempt,
        "p_lease_s": lease_s,
        "p_max_lease_s": max_lease_s,
        "p_gpu_s": gpu_s,
    }
    with transaction(sessions) as session:
        return _changed(session.execute(_RENEW, params)) == 1


@functools.cache
def _finish_and_roll_up() -> Any:
    """PostgreSQL: the finish and its rollup in one statement (`shared.usage.finish_and_roll_up`),
    built once, at the first finish on PostgreSQL: it loads the PostgreSQL dialect, which a command
    on SQLite must not pay for (tests/scheduler/cli/test_startup_imports.py)."""
    return finish_and_roll_up(_FINISH)


def finish_job(*, sessions: sessionmaker[Session], job_id: str, attempt: int, result: JobResult) -> bool:
    """Mark the job succeeded, only if this attempt still holds it; counted in the rollup with it
    (a fenced-out attempt adds nothing)."""
    params: dict[str, Any] = {"p_id": job_id, "p_attempt": attempt}
    params.update({f"p_{name}": getattr(result, name) for name in _RESULT_FIELDS})
    if dialect_of(sessions) == "postgresql":  # one statement: the finish and its rollup
        with autocommit(sessions) as connection:
            return connection.execute(_finish_and_roll_up(), params).first() is not None
    with transaction(sessions) as session:
        if _changed(session.execute(_FINISH, params)) != 1:
            return False
        roll_up_job(session, job_id)
        return True


def _attempt_lost(gpu_s: float | None) -> dict[str, Any]:
    """The values that count an attempt's device seconds as lost: `gpu_s` when its worker knows
    them, else what it reported at its last heartbeat."""
    spent = Job.attempt_gpu_s if gpu_s is None else gpu_s
    return {"lost_gpu_s": Job.lost_gpu_s + spent, "attempt_gpu_s": 0.0}


def fail_job(
    *,
    sessions: sessionmaker[Session],
    job_id: str,
    attempt: int | None,
    error_type: str,
    message: str,
    gpu_s: float | None = None,
) -> bool:
    """Mark a job failed with its reason; fenced by attempt when one is given. `gpu_s`: what the
    failed attempt used (lost, not billed)."""
    where = _fenced(job_id, attempt) if attempt is not None else and_(Job.id == job_id, row_status().in_(LIVE))
    stmt = (
        _update()
        .where(where)
        .values(
            status=JobStatus.failed.value,
            finished_at=server_now(),
            expires_at=expiry_on_finish(),
            lease_expires_at=None,
            error_type=error_type,
            error_message=message[:2000],
        )
        .values(_attempt_lost(gpu_s))
    )
    with transaction(sessions) as session:
        if _changed(session.execute(stmt)) != 1:
            return False
        roll_up_job(session, job_id)
        return True


def release_job(
    *,
    sessions: sessionmaker[Session],
    job_id: str,
    attempt: int,
    max_attempts: int,
    error_type: str,
    message: str,
    gpu_s: float | None = None,
) -> str:
    """Give a job back after a transient fault outlasted its retries: queued again, or failed
    once its attempts are spent. Returns the new status ("" if this attempt no longer holds it).
    `gpu_s`: what the attempt used (lost, not billed).
    """
    with transaction(sessions) as session:
        held = select(Job.attempts, Job.attempt_floor, Job.deleted_at).where(_fenced(job_id, attempt))
        job = session.execute(held).one_or_none()
        if job is None:
            return ""
        if job.deleted_at is not None:  # its deletion was asked for while it ran: it ends here, not queued again
            values: dict[str, Any] = {"status": JobStatus.canceled.value, "finished_at": server_now()}
        elif job.attempts - job.attempt_floor >= max_attempts:
            values = {
                "status": JobStatus.failed.value,
                "finished_at": server_now(),
                "expires_at": expiry_on_finish(),
                "error_type": error_type,
                "error_message": f"{message[:1800]} (after {max_attempts} attempts)",
            }
        else:
            values = {"status": JobStatus.queued.value, "enqueued_at": None, "worker_host": None}
        lost = _attempt_lost(gpu_s)
        session.execute(_update().where(_fenced(job_id, attempt)).values(lease_expires_at=None, **values, **lost))
        if values["status"] != JobStatus.queued.value:
            roll_up_job(session, job_id)
        return str(values["status"])


def expire_leases(*, sessions: sessionmaker[Session], max_attempts: int) -> tuple[list[str], list[str]]:
    """Jobs whose worker stopped renewing: back to queued, or failed after `max_attempts`; those
    whose deletion was asked for while they ran are canceled instead (they are going). Canceled
    jobs whose worker never reported its steps before the lease lapsed: their attempt is lost.

    Returns (requeued ids, failed ids).
    """
    now = server_now()
    expired = and_(Job.status == JobStatus.running.value, Job.lease_expires_at < now)
    spent = (Job.attempts - Job.attempt_floor) >= max_attempts
    deleted = Job.deleted_at.is_not(None)
    with transaction(sessions) as session:
        _cancel_deleted(session, and_(expired, deleted), now)
        _give_up_reports(session, now)
        failed = list(session.scalars(select(Job.id).where(expired, spent, ~deleted)).all())
        requeued = list(session.scalars(select(Job.id).where(expired, ~spent, ~deleted)).all())
        if failed:
            stmt = (
                _update()
                .where(Job.id.in_(failed), expired)
                .values(
                    status=JobStatus.failed.value,
                    finished_at=now,
                    expires_at=expiry_on_finish(),
                    lease_expires_at=None,
                    error_type="WorkerLost",
                    error_message=f"worker lost {max_attempts} times",
                )
                .values(_attempt_lost(None))
                .returning(Job.id)
            )
            ended = list(session.execute(stmt).scalars())
            if ended:
                roll_up_ended(session, Job.id.in_(ended))
        if requeued:
            session.execute(
                _update()
                .where(Job.id.in_(requeued), expired)
                .values(status=JobStatus.queued.value, lease_expires_at=None, enqueued_at=None)
                .values(_attempt_lost(None))
            )
    return requeued, failed


def _cancel_deleted(session: Session, where: Any, now: Any) -> None:
    """Deleted jobs whose lease expired: canceled (their expiry stays the deletion's), counted as they end."""
    stmt = (
        _update()
        .where(where)
        .values(status=JobStatus.canceled.value, finished_at=now, lease_expires_at=None)
        .values(_attempt_lost(None))
        .returning(Job.id)
    )
    ended = list(session.execute(stmt).scalars())
    if ended:
        roll_up_ended(session, Job.id.in_(ended))


def _give_up_reports(session: Session, now: Any) -> None:
    """Canceled jobs whose lease lapsed before their worker reported (AWAITING_REPORT): nothing of
    the attempt is billed; what it reported at its heartbeats is lost, dated today. Their wait ends,
    so their `job.canceled` event goes out (with the nothing billed); a report later is a lost one's."""
    lapsed = and_(AWAITING_REPORT, Job.lease_expires_at < now)
    for job_id, reported_s in session.execute(select(Job.id, Job.attempt_gpu_s).where(lapsed)).all():
        # Fenced on the wait: a report that landed since has ended it, and was billed.
        stmt = _update().where(Job.id == job_id, lapsed).values(lease_expires_at=None, **_attempt_lost(None))
        if _changed(session.execute(stmt)) == 1 and reported_s:
            roll_up_late(session, job_id, lost_gpu_s=reported_s)


def record_left_attempt(
    *, sessions: sessionmaker[Session], job_id: str, attempt: int, usage: AttemptUsage, reported_s: float
) -> bool:
    """What an attempt used that left its job without finishing it (its lease was lost).

    Canceled while this attempt held it, and reported before its lease lapsed: the steps it ran
    are the job's, billed (True); the report ends the wait for it (AWAITING_REPORT), so the job's
    `job.canceled` event, written next, carries them. Otherwise the attempt was lost (taken over,
    or its lease lapsed, canceled or not): its seconds beyond `reported_s` (what its heartbeats
    noted, which a claim or the reconciler moves to `lost_gpu_s`) are added there, not billed (False).
    """
    mine = (Job.id == job_id, Job.attempts == attempt, AWAITING_REPORT, Job.gpu_s.is_(None))
    billed = {"gpu_s": usage.gpu_s, "steps_run": usage.steps_run, "pixel_steps": usage.pixel_steps}
    with transaction(sessions) as session:
        stmt = _update().where(*mine).values(**billed, attempt_gpu_s=0.0, lease_expires_at=None)
        if _changed(session.execute(stmt)) == 1:
            roll_up_late(session, job_id, gpu_s=usage.gpu_s, pixel_steps=usage.pixel_steps)
            return True
        unreported_s = usage.gpu_s - reported_s
        if unreported_s <= 0:
            return False
        stmt = _update().where(Job.id == job_id).values(lost_gpu_s=Job.lost_gpu_s + unreported_s).returning(Job.status)
        status = session.execute(stmt).scalar_one_or_none()
        if status in _ENDED:  # the job ended already: its rollup row learns it now
            roll_up_late(session, job_id, lost_gpu_s=unreported_s)
        return False


def hand_back_paused(*, sessions: sessionmaker[Session], job_id: str) -> bool:
    """A delivered job of a paused batch goes back to waiting for dispatch (its message is gone)."""
    paused = select(Batch.id).where(Batch.id == Job.batch_id, Batch.paused.is_(True)).exists()
    stmt = _update().where(Job.id == job_id, row_status() == JobStatus.queued.value, paused).values(enqueued_at=None)
    with transaction(sessions) as session:
        return _changed(session.execute(stmt)) == 1


def undispatch(*, sessions: sessionmaker[Session], job_ids: Sequence[str]) -> set[str]:
    """Queued jobs whose message was lost wait for the dispatcher again; returns those changed."""
    changed: set[str] = set()
    for start in range(0, len(job_ids), 1000):
        chunk = list(job_ids[start : start + 1000])
        stmt = (
            update(Job)
            .where(Job.id.in_(chunk), row_status() == JobStatus.queued.value, Job.enqueued_at.is_not(None))
            .values(enqueued_at=None)
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        )
        with transaction(sessions) as session:
            changed.update(session.scalars(stmt))
    return changed
