"""Which tenants the dispatcher holds back, and how many more jobs each may start: read from SQL.

A tenant with `max_running` (`tenant_quotas`) may have that many jobs running or dispatched
(in Redis, about to run) at once; past it, its queued jobs wait and every other tenant goes
on (the policy skips it, `Policy.order(caps=...)`). A tenant whose GPU-seconds quota of the
day or month is spent starts nothing until the window resets: GPU-seconds are known only
after a job ran, so this is what keeps a plan's thousand queued jobs from spending a week's
budget (only the jobs already running can pass it).

Read at each re-read of the backlog. The count spans every model set; each model set's
dispatcher counts its own starts until its next re-read, so two model sets' dispatchers can
together pass a cap by what they start between two re-reads (IPAB_DISPATCH_RESCAN_S).
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import and_, case, func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from shared.db import Batch, Job, JobStatus, TenantQuota, UsageRollup
from shared.jobs import transaction
from shared.usage import DAY, MONTH, window_start


def jobs_in_flight(session: Session, tenants: list[str]) -> dict[str, int]:
    """Jobs running or dispatched (queued with a message in Redis), per tenant of `tenants`."""
    flying = or_(
        Job.status == JobStatus.running.value,
        and_(Job.status == JobStatus.queued.value, Job.enqueued_at.is_not(None)),
    )
    stmt = (
        select(Batch.tenant, func.count())
        .select_from(Job)
        .join(Batch, Batch.id == Job.batch_id)
        .where(Batch.tenant.in_(tenants), flying)
        .group_by(Batch.tenant)
    )
    return {tenant: int(n) for tenant, n in session.execute(stmt).tuples()}


def _gpu_used(session: Session, tenants: list[str], now: datetime) -> dict[str, tuple[float, float]]:
    """Billed GPU-seconds of the UTC day and month, per tenant of `tenants`."""
    today = window_start(DAY, now)
    stmt = (
        select(
            UsageRollup.tenant,
            func.sum(case((UsageRollup.day >= today, UsageRollup.gpu_s), else_=0.0)),
            func.sum(UsageRollup.gpu_s),
        )
        .where(UsageRollup.tenant.in_(tenants), UsageRollup.day >= window_start(MONTH, now))
        .group_by(UsageRollup.tenant)
    )
    return {tenant: (float(day or 0.0), float(month or 0.0)) for tenant, day, month in session.execute(stmt).tuples()}


def _spent(quota: TenantQuota, used: tuple[float, float]) -> bool:
    day_s, month_s = used
    return (quota.gpu_s_per_day is not None and day_s >= quota.gpu_s_per_day) or (
        quota.gpu_s_per_month is not None and month_s >= quota.gpu_s_per_month
    )


def starts_left(*, sessions: sessionmaker[Session], now: datetime) -> dict[str, int]:
    """How many more jobs each held tenant may start now; a tenant absent is not held."""
    limited = or_(
        TenantQuota.max_running.is_not(None),
        TenantQuota.gpu_s_per_day.is_not(None),
        TenantQuota.gpu_s_per_month.is_not(None),
    )
    with transaction(sessions) as session:
        quotas = list(session.scalars(select(TenantQuota).where(limited)))
        if not quotas:
            return {}
        capped = [q.tenant for q in quotas if q.max_running is not None]
        flying = jobs_in_flight(session, capped) if capped else {}
        gpu_limited = [q.tenant for q in quotas if q.gpu_s_per_day is not None or q.gpu_s_per_month is not None]
        used = _gpu_used(session, gpu_limited, now) if gpu_limited else {}
    left: dict[str, int] = {}
    for quota in quotas:
        if _spent(quota, used.get(quota.tenant, (0.0, 0.0))):
            left[quota.tenant] = 0
        elif quota.max_running is not None:
            left[quota.tenant] = max(quota.max_running - flying.get(quota.tenant, 0), 0)
    return left
