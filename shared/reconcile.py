"""The reconciler: SQL is the truth, Redis only the transport (the outbox pattern).

Each pass (1) returns jobs whose worker lease expired to the queue, or fails them after
`max_attempts`, and (2) re-enqueues every queued job whose message is not in Redis: never
pushed (Redis was down at submission), lost (FLUSHALL, a restart without persistence) or
stuck unacknowledged with a dead worker for longer than the visibility timeout. Running
twice is harmless (claims are conditional), so one lock in Redis keeps only one active.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Final

import redis
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from shared import keys
from shared.db import Batch, Job, JobStatus, utcnow
from shared.errors import InvalidInput, TransientError
from shared.jobs import expire_leases, fail_job, mark_enqueued, transaction
from shared.queue import enqueue_jobs, missing_from_queue
from shared.settings import Settings
from shared.spec import parse_spec
from shared.wire import JobMessage

log = logging.getLogger(__name__)
SCAN_CHUNK = 5000


@dataclass
class ReconcileReport:
    """What one pass did."""

    requeued_expired: list[str] = field(default_factory=list)
    failed_lost: list[str] = field(default_factory=list)
    reenqueued: list[str] = field(default_factory=list)


def _stale_queued(*, sessions: sessionmaker[Session], settings: Settings) -> list[tuple[str, str, str, str, bool]]:
    """(job id, batch id, spec, model set, long-stuck) of queued jobs enqueued a while ago or never."""
    now = utcnow()
    grace = now - timedelta(seconds=settings.requeue_grace_s)
    stuck = now - timedelta(seconds=settings.visibility_timeout_s)
    stmt = (
        select(Job.id, Job.batch_id, Job.spec, Batch.model_set, Job.enqueued_at)
        .join(Batch, Batch.id == Job.batch_id)
        .where(Job.status == JobStatus.queued.value, or_(Job.enqueued_at.is_(None), Job.enqueued_at < grace))
    )
    with transaction(sessions) as session:
        rows = session.execute(stmt).all()
    return [(r[0], r[1], r[2], r[3], r[4] is not None and r[4] < stuck) for r in rows]


def _reenqueue(
    *, sessions: sessionmaker[Session], redis_client: redis.Redis, settings: Settings, report: ReconcileReport
) -> None:
    rows = _stale_queued(sessions=sessions, settings=settings)
    for start in range(0, len(rows), SCAN_CHUNK):
        chunk = rows[start : start + SCAN_CHUNK]
        absent = set(
            missing_from_queue(redis_client=redis_client, prefix=settings.redis_prefix, job_ids=[r[0] for r in chunk])
        )
        by_queue: dict[str, list[JobMessage]] = {}
        for job_id, batch_id, spec, model_set, long_stuck in chunk:
            if job_id not in absent and not long_stuck:
                continue
            try:
                message = JobMessage(job_id=job_id, batch_id=batch_id, spec=parse_spec(json.loads(spec)))
            except (InvalidInput, ValueError) as e:
                fail_job(sessions=sessions, job_id=job_id, attempt=None, error_type="InvalidInput", message=str(e))
                continue
            by_queue.setdefault(keys.render_queue(model_set), []).append(message)
        for queue, messages in by_queue.items():
            enqueue_jobs(redis_client=redis_client, queue=queue, messages=messages, prefix=settings.redis_prefix)
            ids = [m.job_id for m in messages]
            mark_enqueued(sessions=sessions, job_ids=ids)
            report.reenqueued.extend(ids)


def reconcile_once(
    *, sessions: sessionmaker[Session], redis_client: redis.Redis, settings: Settings
) -> ReconcileReport:
    """One pass: expire leases, then re-enqueue queued jobs missing from Redis."""
    report = ReconcileReport()
    # 1. Jobs whose worker stopped renewing its lease go back to the queue (or fail).
    report.requeued_expired, report.failed_lost = expire_leases(sessions=sessions, max_attempts=settings.max_attempts)
    # 2. Queued jobs with no message in Redis get one.
    _reenqueue(sessions=sessions, redis_client=redis_client, settings=settings, report=report)
    if report.requeued_expired or report.failed_lost or report.reenqueued:
        log.info(
            "reconciler: %d lease(s) expired, %d failed after %d attempts, %d re-enqueued",
            len(report.requeued_expired),
            len(report.failed_lost),
            settings.max_attempts,
            len(report.reenqueued),
        )
    return report


# Extend the lock only while it is still ours, in one step: a GET then a PEXPIRE would let a
# holder that stalled past its lease extend the lock of the process that took it over.
_EXTEND_IF_HELD: Final = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) else return 0 end"
)
_RELEASE_IF_HELD: Final = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end"
)


def hold_lock(*, redis_client: redis.Redis, key: str, holder: str, ttl_ms: int) -> bool:
    """Take the fleet-wide reconciler lock if free, or extend it if `holder` has it; True if held.

    Both are atomic in Redis (SET NX PX, then a compare-and-extend script), so at most one
    holder exists at any moment, however the contenders' calls interleave.
    """
    if redis_client.set(key, holder, nx=True, px=ttl_ms):
        return True
    return bool(redis_client.eval(_EXTEND_IF_HELD, 1, key, holder, ttl_ms))


def release_lock(*, redis_client: redis.Redis, key: str, holder: str) -> bool:
    """Let go of the lock if `holder` still has it (never another holder's); True if released."""
    return bool(redis_client.eval(_RELEASE_IF_HELD, 1, key, holder))


def run_reconciler(
    *, sessions: sessionmaker[Session], redis_client: redis.Redis, settings: Settings, stop: threading.Event
) -> None:
    """Reconcile every `reconcile_interval_s` while holding the fleet-wide lock, until `stop` is set.

    Every worker runs this loop; the lock (which lapses after three intervals without renewal,
    e.g. when its holder was killed) makes exactly one of them do the work.
    """
    lock_key = settings.redis_prefix + keys.RECONCILER_LOCK_KEY
    me = uuid.uuid4().hex
    ttl_ms = int(settings.reconcile_interval_s * 3000)
    while not stop.wait(settings.reconcile_interval_s):
        try:
            if hold_lock(redis_client=redis_client, key=lock_key, holder=me, ttl_ms=ttl_ms):
                reconcile_once(sessions=sessions, redis_client=redis_client, settings=settings)
        except (TransientError, redis.RedisError) as e:
            log.warning("reconciler pass skipped: %s", e)
        except Exception:
            log.exception("reconciler pass failed; trying again next interval")
    with contextlib.suppress(redis.RedisError):  # a clean stop hands over at once, not after three intervals
        release_lock(redis_client=redis_client, key=lock_key, holder=me)
