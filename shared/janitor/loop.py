"""The janitor's pass and its loop: one janitor works at a time across the fleet (a Redis lock, as
the reconciler's), in every worker (IPAB_RECONCILE_IN_WORKERS) or in `ipab reconcile --loop`.

A pass works in bounded steps, each a few short transactions and one S3 request for up to
IPAB_JANITOR_BATCH jobs or images; when a step was full, the next pass starts at once, else
the janitor sleeps IPAB_JANITOR_INTERVAL_S or until a deletion wakes it (`wake_janitor`).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

import redis
from sqlalchemy import and_, delete, or_, select
from sqlalchemy.orm import Session, sessionmaker

from shared import keys
from shared.db import Batch, WebhookMessage
from shared.db_clock import server_now
from shared.errors import TransientError
from shared.janitor.deletions import mark_chunk
from shared.janitor.outputs import oldest_due_age_s, purge_deleted_batches, purge_past_retention, remove_due
from shared.janitor.references import remove_marked, unlink_finished_batches
from shared.jobs import transaction
from shared.reconcile import hold_lock, release_lock
from shared.settings import Settings
from shared.storage import ObjectStore

log = logging.getLogger(__name__)

SIGNAL: Final = b"1"
MAX_BLOCK_S: Final = 5.0  # one BLPOP blocks at most this long (the stop flag is seen this often)
MIN_LOCK_TTL_S: Final = 60.0  # a pass may outlast a short interval; the lock is renewed between its steps


@dataclass
class JanitorReport:
    """What one pass did."""

    jobs_marked: int = 0  # jobs of deleted batches that their deletion had not marked yet (it stopped part way)
    jobs_removed: int = 0  # jobs whose objects are gone (marked removed, or deleted with their row)
    objects_deleted: int = 0  # recorded outputs, reference images and embeddings deleted
    bytes_deleted: int = 0  # their sizes, as recorded (outputs, images) or listed (embeddings)
    rows_purged: int = 0  # job rows deleted (deletions asked for, the metadata's retention)
    batches_purged: int = 0
    references_removed: int = 0
    outbox_purged: int = 0
    lag_s: float | None = None  # how long ago the oldest expiry not yet acted on passed; None: not read
    more: bool = False  # a step was full: more work waits
    complete: bool = True  # False: the pass stopped midway (the lock was lost, or a step failed)

    def changed(self) -> bool:
        """Whether the pass marked or removed anything."""
        return any(
            (self.jobs_marked, self.jobs_removed, self.rows_purged, self.batches_purged, self.references_removed)
        )


Observer = Callable[[JanitorReport | None], None]  # None: this process does not hold the janitor's lock


def _purge_outbox(*, sessions: sessionmaker[Session], retention_s: float, limit: int) -> tuple[int, bool]:
    """Webhook messages delivered (or given up) longer than the metadata's retention ago."""
    old = and_(
        or_(WebhookMessage.delivered_at.is_not(None), WebhookMessage.failed_at.is_not(None)),
        WebhookMessage.created_at <= server_now(-retention_s),
    )
    with transaction(sessions) as session:
        ids = list(session.scalars(select(WebhookMessage.id).where(old).limit(limit)))
        if ids:
            session.execute(
                delete(WebhookMessage).where(WebhookMessage.id.in_(ids)).execution_options(synchronize_session=False)
            )
    return len(ids), len(ids) == limit


@dataclass(frozen=True)
class _Clients:
    """What every step of a pass works with."""

    sessions: sessionmaker[Session]
    store: ObjectStore
    redis_client: redis.Redis
    settings: Settings

    @property
    def limit(self) -> int:
        """Jobs or images per step."""
        return self.settings.janitor_batch


def _jobs_of_deleted_batches(c: _Clients, report: JanitorReport) -> None:
    """Jobs of deleted batches not marked yet (a deletion that stopped part way): marked, so due now."""
    marked, more = mark_chunk(sessions=c.sessions, limit=c.limit)
    report.jobs_marked += marked
    report.more = report.more or more


def _objects_of_due_jobs(c: _Clients, report: JanitorReport) -> None:
    """Objects of due jobs (first those a janitor that died left `removing`); deleted jobs' rows."""
    done = remove_due(
        sessions=c.sessions, store=c.store, redis_client=c.redis_client, prefix=c.settings.redis_prefix, limit=c.limit
    )
    report.jobs_removed += done.jobs
    report.rows_purged += done.purged
    report.objects_deleted += done.objects
    report.bytes_deleted += done.bytes
    report.more = report.more or done.more


def _rows_past_retention(c: _Clients, report: JanitorReport) -> None:
    """Rows past the metadata's retention (a batch whose last rows they were goes too), and webhook
    messages as old (nothing, when it is unset)."""
    retention_s = c.settings.retention_metadata_s
    if retention_s is None:
        return
    purged, batch_ids, more = purge_past_retention(
        sessions=c.sessions,
        redis_client=c.redis_client,
        prefix=c.settings.redis_prefix,
        retention_s=retention_s,
        limit=c.limit,
    )
    if batch_ids:  # those whose last rows just went go too
        only = Batch.id.in_(batch_ids)
        batches, objects, size, _ = purge_deleted_batches(
            sessions=c.sessions, store=c.store, limit=len(batch_ids), only=only, past_retention=True
        )
        report.batches_purged += batches
        report.objects_deleted += objects
        report.bytes_deleted += size
    outbox, more_outbox = _purge_outbox(sessions=c.sessions, retention_s=retention_s, limit=c.limit)
    report.rows_purged += purged
    report.outbox_purged += outbox
    report.more = report.more or more or more_outbox


def _deleted_batches(c: _Clients, report: JanitorReport) -> None:
    """Deleted batches with no job left, with what their folders still hold."""
    batches, objects, size, more = purge_deleted_batches(sessions=c.sessions, store=c.store, limit=c.limit)
    report.batches_purged += batches
    report.objects_deleted += objects
    report.bytes_deleted += size
    report.more = report.more or more


def _unused_images(c: _Clients, report: JanitorReport) -> None:
    """Images nothing uses any more: batches done with them let go of them, then the unused go."""
    _, more = unlink_finished_batches(sessions=c.sessions, limit=c.limit)
    images = remove_marked(
        sessions=c.sessions, store=c.store, redis_client=c.redis_client, prefix=c.settings.redis_prefix, limit=c.limit
    )
    report.references_removed += images.images
    report.objects_deleted += images.objects
    report.bytes_deleted += images.bytes
    report.more = report.more or more or images.more


STEPS: Final = (_jobs_of_deleted_batches, _objects_of_due_jobs, _rows_past_retention, _deleted_batches, _unused_images)


def janitor_pass(
    *,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    redis_client: redis.Redis,
    settings: Settings,
    still_held: Callable[[], bool] = lambda: True,
) -> JanitorReport:
    """One pass, in bounded steps; stops early (`complete` False) when `still_held` says the lock was lost."""
    clients = _Clients(sessions, store, redis_client, settings)
    report = JanitorReport()
    for step in STEPS:
        step(clients, report)
        if not still_held():
            report.complete = False
            return report
    report.lag_s = oldest_due_age_s(sessions=sessions)
    return report


def _failed_pass(sessions: sessionmaker[Session]) -> JanitorReport:
    """The report of a pass that raised: stopped, with the lag when SQL still answers (S3 or Redis may
    be what failed); unread (None) when it does not, and the lag gauge then grows from its last reading."""
    report = JanitorReport(complete=False)
    try:
        report.lag_s = oldest_due_age_s(sessions=sessions)
    except Exception as e:  # whatever failed the pass may fail this too: the report says unread
        log.debug("janitor: lag not read after a failed pass: %s", e)
    return report


def _pass_if_held(c: _Clients, held: Callable[[], bool]) -> JanitorReport | None:
    """A pass when this process holds the janitor's lock (None when another does); a pass that raised
    is reported as failed, so that the lag gauge keeps telling the truth while the janitor cannot work."""
    try:
        if not held():
            return None
        report = janitor_pass(
            sessions=c.sessions, store=c.store, redis_client=c.redis_client, settings=c.settings, still_held=held
        )
    except (TransientError, redis.RedisError) as e:
        log.warning("janitor pass stopped (it goes on next interval): %s", e)
        return _failed_pass(c.sessions)
    except Exception:
        log.exception("janitor pass failed; trying again next interval")
        return _failed_pass(c.sessions)
    if report.changed():
        log.info("janitor: %s", report)
    return report


def signal_key(prefix: str) -> str:
    """The Redis list an idle janitor blocks on."""
    return prefix + keys.JANITOR_SIGNAL_KEY


def wake_janitor(*, redis_client: redis.Redis, prefix: str) -> bool:
    """Tell the janitor that a deletion waits; False when Redis does not answer (it looks every interval anyway)."""
    try:
        pipe = redis_client.pipeline(transaction=False)
        pipe.lpush(signal_key(prefix), SIGNAL)
        pipe.ltrim(signal_key(prefix), 0, 0)
        pipe.execute()
    except redis.RedisError as e:
        log.warning("could not wake the janitor (it looks every IPAB_JANITOR_INTERVAL_S anyway): %s", e)
        return False
    return True


def _sleep(*, redis_client: redis.Redis, prefix: str, stop: threading.Event, interval_s: float) -> None:
    """Until the interval passed, a deletion woke the janitor, or `stop` was set."""
    socket_timeout_s = redis_client.connection_pool.connection_kwargs.get("socket_timeout")
    block_s = MAX_BLOCK_S if socket_timeout_s is None else min(MAX_BLOCK_S, float(socket_timeout_s) / 2)
    deadline = time.monotonic() + interval_s
    while not stop.is_set() and (left_s := deadline - time.monotonic()) > 0:
        try:
            if redis_client.blpop([signal_key(prefix)], timeout=max(0.01, min(left_s, block_s))) is not None:
                return
        except redis.RedisError:
            stop.wait(min(left_s, block_s))


def run_janitor(
    *,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    redis_client: redis.Redis,
    settings: Settings,
    stop: threading.Event,
    observe: Observer = lambda _report: None,
) -> None:
    """Pass after pass while holding the fleet-wide janitor lock, until `stop` is set."""
    lock_key = settings.redis_prefix + keys.JANITOR_LOCK_KEY
    me = uuid.uuid4().hex
    ttl_ms = int(max(settings.janitor_interval_s * 3, MIN_LOCK_TTL_S) * 1000)

    def held() -> bool:
        return hold_lock(redis_client=redis_client, key=lock_key, holder=me, ttl_ms=ttl_ms)

    clients = _Clients(sessions, store, redis_client, settings)
    while not stop.is_set():
        report = _pass_if_held(clients, held)
        try:
            observe(report)
        except Exception:
            log.exception("janitor: counting a pass failed (the janitor goes on)")
        if report is None or not report.more:
            _sleep(
                redis_client=redis_client,
                prefix=settings.redis_prefix,
                stop=stop,
                interval_s=settings.janitor_interval_s,
            )
    with contextlib.suppress(redis.RedisError):  # a clean stop hands over at once
        release_lock(redis_client=redis_client, key=lock_key, holder=me)
