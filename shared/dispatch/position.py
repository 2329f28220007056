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
from typing import Final

from sqlalchemy import func, select, tuple_
from sqlalchemy.orm import Session, sessionmaker

from shared.db import Batch, Job, JobStatus
from shared.dispatch.dispatcher import Key, backlog_counts
from shared.dispatch.policy import Policy
from shared.jobs import transaction
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
    for index, start in enumerate(policy.order(counts, SIMULATE_MAX)):
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


def forecast_job(
    *, sessions: sessionmaker[Session], settings: Settings, job_id: str, dispatched: int, now: datetime
) -> Forecast | None:
    """The forecast of one queued job; None when it is not queued (or not waiting for dispatch)."""
    with transaction(sessions) as session:
        row = session.execute(
            select(Job.lane, Batch.tenant, Batch.model_set, Job.queued_at, Job.line, Job.id, Job.enqueued_at)
            .join(Batch, Batch.id == Job.batch_id)
            .where(Job.id == job_id, Job.status == JobStatus.queued.value)
        ).one_or_none()
        if row is None:
            return None
        lane, tenant, model_set, queued_at, line, jid, enqueued_at = row
        ahead = 0
        if enqueued_at is None:
            ahead = int(
                session.scalar(
                    select(func.count())
                    .select_from(Job)
                    .join(Batch, Batch.id == Job.batch_id)
                    .where(
                        Job.status == JobStatus.queued.value,
                        Job.enqueued_at.is_(None),
                        Job.lane == lane,
                        Batch.tenant == tenant,
                        Batch.model_set == model_set,
                        tuple_(Job.queued_at, Job.line, Job.id) < tuple_(queued_at, line, jid),
                    )
                )
                or 0
            )
    return _forecast(
        sessions=sessions,
        settings=settings,
        model_set=model_set,
        key=(lane, tenant),
        ahead=ahead,
        dispatched=dispatched,
        waiting=enqueued_at is None,
        now=now,
    )


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
