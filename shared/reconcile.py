"""The reconciler: SQL is the truth, Redis only the transport (the outbox pattern).

Each pass (1) returns jobs whose worker lease expired to the queue, or fails them after
`max_attempts`, and (2) hands back to the dispatcher (clears `enqueued_at`) every dispatched
job whose message is not in Redis: lost (FLUSHALL, a restart without persistence, a
dispatcher that died between marking a job and pushing it) or stuck unacknowledged with a
dead worker for longer than the visibility timeout. The dispatcher (`shared.dispatch`)
then pushes them again in policy order. Every time is the database server's. Running
twice is harmless (claims are conditional), so one lock in Redis keeps only one active.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import uuid
from dataclasses import dataclass, field
from typing import Final

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from shared import keys
from shared.db import Batch, Job, JobStatus
from shared.db_clock import server_now
from shared.dispatch.wake import wake_dispatcher
from shared.errors import TransientError
from shared.jobs import expire_leases, transaction, undispatch
from shared.queue import missing_from_queue
from shared.settings import Settings

log = logging.getLogger(__name__)
SCAN_CHUNK = 5000


@dataclass
class ReconcileReport:
    """What one pass did."""

    requeued_expired: list[str] = field(default_factory=list)
    failed_lost: list[str] = field(default_factory=list)
    reenqueued: list[str] = field(default_factory=list)


def _stale_dispatched(*, sessions: sessionmaker[Session], settings: Settings) -> list[tuple[str, str, bool]]:
    """(job id, model set, long-stuck) of queued jobs handed to Redis a while ago (by the server's clock)."""
    grace = server_now(-settings.requeue_grace_s)
    stuck = server_now(-settings.visibility_timeout_s)
    stmt = (
        select(Job.id, Batch.model_set, Job.enqueued_at < stuck)
        .join(Batch, Batch.id == Job.batch_id)
        .where(Job.status == JobStatus.queued.value, Job.enqueued_at.is_not(None), Job.enqueued_at < grace)
    )
    with transaction(sessions) as session:
        return [(r[0], r[1], bool(r[2])) for r in session.execute(stmt)]


def _hand_back_lost(
    *, sessions: sessionmaker[Session], redis_client: redis.Redis, settings: Settings, report: ReconcileReport
) -> set[str]:
    """Dispatched jobs whose message is gone from Redis (or stuck past the visibility timeout) wait
    for dispatch again; returns the model sets concerned."""
    rows = _stale_dispatched(sessions=sessions, settings=settings)
    model_sets: set[str] = set()
    for start in range(0, len(rows), SCAN_CHUNK):
        chunk = rows[start : start + SCAN_CHUNK]
        absent = set(
            missing_from_queue(redis_client=redis_client, prefix=settings.redis_prefix, job_ids=[r[0] for r in chunk])
        )
        lost = [(job_id, model_set) for job_id, model_set, long_stuck in chunk if job_id in absent or long_stuck]
        handed = undispatch(sessions=sessions, job_ids=[job_id for job_id, _ in lost])
        report.reenqueued.extend(sorted(handed))
        model_sets.update(model_set for job_id, model_set in lost if job_id in handed)
    return model_sets


def _model_sets_of(*, sessions: sessionmaker[Session], job_ids: list[str]) -> set[str]:
    stmt = select(Batch.model_set).join(Job, Job.batch_id == Batch.id).where(Job.id.in_(job_ids[:SCAN_CHUNK]))
    with transaction(sessions) as session:
        return set(session.scalars(stmt.distinct()))


def reconcile_once(
    *, sessions: sessionmaker[Session], redis_client: redis.Redis, settings: Settings
) -> ReconcileReport:
    """One pass: expire leases, then re-enqueue queued jobs missing from Redis."""
    report = ReconcileReport()
    # 1. Jobs whose worker stopped renewing its lease go back to the queue (or fail).
    report.requeued_expired, report.failed_lost = expire_leases(sessions=sessions, max_attempts=settings.max_attempts)
    # 2. Dispatched jobs whose message was lost wait for the dispatcher again.
    woken = _hand_back_lost(sessions=sessions, redis_client=redis_client, settings=settings, report=report)
    # 3. The dispatchers of the model sets concerned re-read their backlog now.
    if report.requeued_expired:
        woken.update(_model_sets_of(sessions=sessions, job_ids=report.requeued_expired))
    for model_set in sorted(woken):
        wake_dispatcher(redis_client=redis_client, settings=settings, model_set=model_set)
    if report.requeued_expired or report.failed_lost or report.reenqueued:
        log.info(
            "reconciler: %d lease(s) expired, %d failed after %d attempts, %d re-enqueued",
            len(report.requeued_expired),
            len(report.failed_lost),
            settings.max_attempts,
            len(report.reenqueued),
        )
    return report


# Take the lock if free, or extend it only while it is still ours, in one step: a GET then a
# PEXPIRE would let a holder that stalled past its lease extend the lock of the process that
# took it over. One script is one round trip for a holder renewing (a dispatcher, a few times per lock lifetime).
_HOLD: Final = """
local holder = redis.call('GET', KEYS[1])
if holder == ARGV[1] then return redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if holder then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
_RELEASE_IF_HELD: Final = (
    "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) else return 0 end"
)


def hold_lock(*, redis_client: redis.Redis, key: str, holder: str, ttl_ms: int) -> bool:
    """Take the fleet-wide reconciler lock if free, or extend it if `holder` has it; True if held.

    One script, atomic in Redis, so at most one holder exists at any moment, however the
    contenders' calls interleave.
    """
    return bool(redis_client.eval(_HOLD, 1, key, holder, ttl_ms))


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
