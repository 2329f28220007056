"""Queue position and ETA as the policy will order the work, not as rows happen to lie in a list.

A queued job's position is the number of jobs that start before it: the few already handed to
Redis, then the undispatched ones in the order the policy (`Policy.order`) would choose them,
given what waits in each (lane, tenant) now. Its ETA is that position over the model set's
recent throughput. Both move as work arrives in other lanes: they are forecasts, recomputed on
every call.

What one forecast reads grows with the job's own tenant, not with everyone's backlog: the jobs
ahead of it in its (lane, tenant) are counted on the per-batch index, within that tenant's
batches. Only the backlog counts of every (lane, tenant) grow with all queued work (a GROUP
BY over it: 60 to 300 ms beside another tenant's 99,000 queued jobs on SQLite, measured
(bench/two_tenants.py), on every GET of every tenant's queued job). A process that serves
many forecasts (the API) passes `backlog=BacklogSnapshots(sessions).counts`: the counts are
then read at most once per `max_age_s` per model set, in a thread of their own, and a
forecast uses the latest snapshot, a second or so old at most.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import redis
from sqlalchemy import func, or_, select, tuple_
from sqlalchemy.orm import Session, sessionmaker

from shared import keys
from shared.db import Batch, Job, JobStatus
from shared.dispatch.dispatcher import Key, backlog_counts
from shared.dispatch.policy import Policy
from shared.jobs import transaction
from shared.redis_conn import GLANCE, connect_redis
from shared.settings import Settings

SIMULATE_MAX: Final = 50_000  # beyond this many starts, extrapolate from the key's share
THROUGHPUT_WINDOW_S: Final = 300.0
BACKLOG_MAX_AGE_S: Final = 1.0  # a snapshot of the backlog counts older than this is read again

log = logging.getLogger(__name__)
Backlog = Callable[[str], dict[Key, int]]  # model set -> queued, undispatched jobs per (lane, tenant)


@dataclass(frozen=True)
class Forecast:
    """Where a queued job (or a batch's last queued job) stands."""

    position: int  # jobs that start before it
    eta_s: float | None  # None until the model set has finished work recently


def starts_before(*, policy: Policy, counts: dict[Key, int], key: Key, ahead_in_key: int) -> int:
    """How many starts come before the (`ahead_in_key`+1)-th job of `key`, in policy order."""
    seen = 0
    for index, start in enumerate(policy.starts(counts, SIMULATE_MAX)):  # stops at the job: see `starts`
        if start == key:
            if seen == ahead_in_key:
                return index
            seen += 1
    share = max(seen, 1) / SIMULATE_MAX
    return int(ahead_in_key / share)


@dataclass(frozen=True)
class _Snapshot:
    counts: dict[Key, int]
    read_at: float  # on the snapshots' clock


class BacklogSnapshots:
    """Each model set's backlog counts, shared by the forecasts of one process (`backlog=...counts`).

    A snapshot younger than `max_age_s` is used as it is. An older one, up to `max_stale_s`, is
    used too, while a thread of its own reads the next (one at a time per model set): no
    forecast waits for that read. With none, or one older than `max_stale_s` (a process that
    served no forecast for a while), the forecast reads the counts itself.
    """

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        max_age_s: float = BACKLOG_MAX_AGE_S,
        max_stale_s: float = 10 * BACKLOG_MAX_AGE_S,
        clock: Callable[[], float] = time.monotonic,
        read: Backlog | None = None,
    ) -> None:
        self.max_age_s = max_age_s
        self.max_stale_s = max_stale_s
        self._clock = clock
        self._read: Backlog = read or (lambda model_set: backlog_counts(sessions=sessions, model_set=model_set))
        self._snapshots: dict[str, _Snapshot] = {}
        self._reading: set[str] = set()
        self._lock = threading.Lock()

    def counts(self, model_set: str) -> dict[Key, int]:
        """Queued, undispatched jobs of unpaused batches per (lane, tenant) of `model_set`: the latest snapshot."""
        with self._lock:
            snapshot = self._snapshots.get(model_set)
            if snapshot is None:
                background = False
            else:
                age = self._clock() - snapshot.read_at
                if age < self.max_age_s:
                    return snapshot.counts
                background = age < self.max_stale_s
            start = background and model_set not in self._reading
            if start:
                self._reading.add(model_set)
        if snapshot is None or not background:
            return self._refresh(model_set)
        if start:
            threading.Thread(target=self._refresh_quietly, args=(model_set,), name="backlog", daemon=True).start()
        return snapshot.counts

    def _refresh(self, model_set: str) -> dict[Key, int]:
        counts = self._read(model_set)
        with self._lock:
            self._snapshots[model_set] = _Snapshot(counts, self._clock())
        return counts

    def _refresh_quietly(self, model_set: str) -> None:
        try:
            self._refresh(model_set)
        except Exception:  # the next forecast tries again (or reads itself, once the snapshot is too old)
            log.warning("reading the backlog counts of model set %r failed", model_set, exc_info=True)
        finally:
            with self._lock:
                self._reading.discard(model_set)


def throughput_per_s(*, sessions: sessionmaker[Session], model_set: str, now: datetime) -> float:
    """Jobs of the model set that finished in the last few minutes, per second."""
    since = now - timedelta(seconds=THROUGHPUT_WINDOW_S)
    stmt = (
        select(func.count())
        .select_from(Job)
        .join(Batch, Batch.id == Job.batch_id)
        .where(Batch.model_set == model_set, Job.finished_at >= since, Job.status == JobStatus.succeeded.value)
    )
    with transaction(sessions) as session:
        return float(session.scalar(stmt) or 0) / THROUGHPUT_WINDOW_S


def _ahead_in_key(session: Session, *, model_set: str, key: Key, batch: Batch, before: Any) -> int:
    """Undispatched jobs of the same (lane, tenant) that the dispatcher takes first: those of older
    batches, then this batch's jobs matching `before` (FIFO within a tenant's lane).

    Counted on the (batch_id, status, lane, ...) index, one range per batch of the tenant: joined
    to batches instead, SQLite walked the status index, every queued job of every tenant (90 ms
    beside another tenant's 99,000, for a tenant with one job).
    """
    lane, tenant = key
    batches = select(Batch.id).where(
        Batch.tenant == tenant,
        Batch.model_set == model_set,
        Batch.paused.is_(False),
        Batch.deleted_at.is_(None),
        or_(Batch.created_at < batch.created_at, Batch.id == batch.id),
    )
    stmt = (
        select(func.count())
        .select_from(Job)
        .where(
            Job.batch_id.in_(batches),
            Job.status == JobStatus.queued.value,
            Job.lane == lane,
            Job.enqueued_at.is_(None),
            or_(Job.batch_id != batch.id, before),
        )
    )
    return int(session.scalar(stmt) or 0)


def forecast_job(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    job_id: str,
    dispatched: int,
    now: datetime,
    backlog: Backlog | None = None,
) -> Forecast | None:
    """The forecast of one queued job; None when it is not queued. `backlog`: where the backlog
    counts come from (default: read now)."""
    with transaction(sessions) as session:
        found = session.execute(
            select(Job, Batch)
            .join(Batch, Batch.id == Job.batch_id)
            .where(Job.id == job_id, Job.status == JobStatus.queued.value)
        ).one_or_none()
        if found is None:
            return None
        job, batch = found
        key = (job.lane, batch.tenant)
        waiting = job.enqueued_at is None
        before = tuple_(Job.queued_at, Job.line) < tuple_(job.queued_at, job.line)
        ahead = _ahead_in_key(session, model_set=batch.model_set, key=key, batch=batch, before=before) if waiting else 0
    return _forecast(
        sessions=sessions,
        settings=settings,
        model_set=batch.model_set,
        key=key,
        ahead=ahead,
        dispatched=dispatched,
        waiting=waiting,
        now=now,
        backlog=backlog,
    )


def forecast_batch(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    batch_id: str,
    dispatched: int,
    now: datetime,
    backlog: Backlog | None = None,
) -> Forecast | None:
    """When the batch's last queued job starts (the latest over its lanes); None when none is queued."""
    with transaction(sessions) as session:
        batch = session.get(Batch, batch_id)
        lanes = session.scalars(
            select(Job.lane).where(Job.batch_id == batch_id, Job.status == JobStatus.queued.value).distinct()
        ).all()
        if batch is None or not lanes:
            return None
        everything = Job.id.is_not(None)
        aheads = {
            lane: _ahead_in_key(
                session, model_set=batch.model_set, key=(lane, batch.tenant), batch=batch, before=everything
            )
            for lane in lanes
        }
    forecasts = [
        _forecast(
            sessions=sessions,
            settings=settings,
            model_set=batch.model_set,
            key=(lane, batch.tenant),
            ahead=max(ahead - 1, 0),
            dispatched=dispatched,
            waiting=ahead > 0,
            now=now,
            backlog=backlog,
        )
        for lane, ahead in aheads.items()
    ]
    return max(forecasts, key=lambda f: f.position)


def _forecast(
    *,
    sessions: sessionmaker[Session],
    settings: Settings,
    model_set: str,
    key: Key,
    ahead: int,
    dispatched: int,
    waiting: bool,
    now: datetime,
    backlog: Backlog | None = None,
) -> Forecast:
    if waiting:
        policy = Policy(lane_weights=settings.lane_weights, tenant_weights=settings.tenant_weights)
        if backlog is None:
            counts = backlog_counts(sessions=sessions, model_set=model_set)
        else:  # a snapshot: its own key counted now (`ahead`), so that the job is in it
            counts = backlog(model_set)
            counts = {**counts, key: max(counts.get(key, 0), ahead + 1)}
        position = dispatched + starts_before(policy=policy, counts=counts, key=key, ahead_in_key=ahead)
    else:
        position = max(dispatched - 1, 0)  # in the shallow Redis queue: at most this many before it
    rate = throughput_per_s(sessions=sessions, model_set=model_set, now=now)
    return Forecast(position=position, eta_s=(position + 1) / rate if rate > 0 else None)


def dispatched_depth(settings: Settings, model_set: str) -> int:
    """Messages waiting in the model set's Redis queue now (0 when Redis does not answer: a forecast only)."""
    client = connect_redis(settings.redis_url, profile=GLANCE)
    try:
        return int(client.llen(keys.render_queue(model_set)))
    except redis.RedisError:
        return 0
    finally:
        client.close()
