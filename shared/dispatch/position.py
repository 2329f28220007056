"""Queue position and ETA as the policy will order the work, not as rows happen to lie in a list.

A queued job's position is the number of jobs that start before it: the few already handed to
Redis, then the undispatched ones in the order the policy (`Policy.order`) would choose them,
given what waits in each (lane, tenant) now. Its ETA is that position over the model set's
recent throughput. Both move as work arrives in other lanes: they are forecasts, recomputed on
every call.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

import redis
from sqlalchemy import and_, func, or_, select, tuple_
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
    batches, then this batch's jobs matching `before` (FIFO within a tenant's lane)."""
    lane, tenant = key
    older = and_(Batch.created_at < batch.created_at)
    stmt = (
        select(func.count())
        .select_from(Job)
        .join(Batch, Batch.id == Job.batch_id)
        .where(
            Job.status == JobStatus.queued.value,
            Job.enqueued_at.is_(None),
            Job.lane == lane,
            Batch.tenant == tenant,
            Batch.model_set == model_set,
            Batch.paused.is_(False),
            or_(older, and_(Job.batch_id == batch.id, before)),
        )
    )
    return int(session.scalar(stmt) or 0)


def forecast_job(
    *, sessions: sessionmaker[Session], settings: Settings, job_id: str, dispatched: int, now: datetime
) -> Forecast | None:
    """The forecast of one queued job; None when it is not queued."""
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
    )


def forecast_batch(
    *, sessions: sessionmaker[Session], settings: Settings, batch_id: str, dispatched: int, now: datetime
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
) -> Forecast:
    if waiting:
        policy = Policy(lane_weights=settings.lane_weights, tenant_weights=settings.tenant_weights)
        counts = backlog_counts(sessions=sessions, model_set=model_set)
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
