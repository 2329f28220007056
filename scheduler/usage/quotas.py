"""Quotas: per tenant, images and GPU-seconds per UTC day and month, and jobs running at once.

Checked where jobs are written (`scheduler.submission.submit`) or failed ones are queued
again (`scheduler.batches.actions.retry_failed`, which the faces hand `check_quotas`), in the
transaction that writes them, under the tenant's lock: the one lock of every per-tenant limit,
`scheduler.batches.limits.lock_tenant` (an advisory lock on PostgreSQL, the write lock on
SQLite), which the queued-jobs cap takes too. The count and the insert are then one step: a
tenant's concurrent submissions take turns, so none passes a limit, on either database, from
any number of processes.

What counts:
- images: the images made in the window (`usage_rollup`) plus the tenant's jobs queued or
  running, each of which will make one. A submission of n jobs is refused, as a whole, if
  that plus n would pass the limit; a job that fails or is canceled gives its image back.
- GPU-seconds: billed seconds in the window. A job's seconds are known only once it ran, so
  a submission is refused once the window's seconds reach the limit, and meanwhile the
  dispatcher starts none of the tenant's queued jobs (`shared.dispatch.holds`): only the
  jobs already running can pass it.
- max_running: the dispatcher starts no more of the tenant's jobs while that many run (or
  wait in Redis); everybody else proceeds. It refuses nothing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields, replace
from datetime import datetime
from typing import Any, Final

from sqlalchemy import delete, func, select, update
from sqlalchemy.orm import Session, sessionmaker

from scheduler.batches.actions import retry_failed
from scheduler.batches.limits import TenantCap, count_tenant_jobs, lock_tenant
from shared.db import QuotaRefusal, TenantQuota, UsageRollup, insert_ignoring_duplicates, utcnow
from shared.dispatch.holds import jobs_in_flight
from shared.errors import InvalidInput, QuotaExceeded
from shared.jobs import LIVE, transaction
from shared.usage import DAY, MONTH, window_of, window_reset, window_start

IMAGE_QUOTAS: Final = ("images_per_day", "images_per_month")
GPU_QUOTAS: Final = ("gpu_s_per_day", "gpu_s_per_month")
QUOTAS: Final = (*IMAGE_QUOTAS, *GPU_QUOTAS, "max_running")


@dataclass(frozen=True)
class Quotas:
    """A tenant's limits; None: no limit of that kind."""

    images_per_day: int | None = None
    images_per_month: int | None = None
    gpu_s_per_day: float | None = None
    gpu_s_per_month: float | None = None
    max_running: int | None = None

    def to_json(self) -> dict[str, Any]:
        """The limits by name (the API's and `ipab quotas show --json`'s)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def refuses(self) -> bool:
        """Whether any limit is checked at submission (images or GPU-seconds)."""
        return any(getattr(self, name) is not None for name in (*IMAGE_QUOTAS, *GPU_QUOTAS))


def _quotas(row: TenantQuota) -> Quotas:
    return Quotas(**{name: getattr(row, name) for name in QUOTAS})


def check_limit(name: str, value: Any) -> int | float | None:
    """A quota's value as stored: a whole number of images or jobs, seconds as a number, >= 0; None clears it."""
    if name not in QUOTAS:
        raise InvalidInput("quota", name, f"is not a quota; use one of {', '.join(QUOTAS)}")
    if value is None:
        return None
    whole = name not in GPU_QUOTAS
    valid = isinstance(value, int) if whole else isinstance(value, int | float)
    if isinstance(value, bool) or not valid or not math.isfinite(value) or value < 0:
        kind = "a whole number" if whole else "a number of seconds"
        raise InvalidInput(name, value, f"must be {kind}, 0 or more (none: no limit)")
    return int(value) if whole else float(value)


def set_quotas(*, session: Session, tenant: str, changes: Mapping[str, Any]) -> Quotas:
    """Set the named limits (None clears one), keeping the others; returns the tenant's quotas."""
    values = {name: check_limit(name, value) for name, value in changes.items()}
    dialect = session.get_bind().dialect.name
    session.execute(
        insert_ignoring_duplicates(TenantQuota, dialect=dialect, unique=["tenant"]).values(
            tenant=tenant, updated_at=utcnow()
        )
    )
    session.execute(update(TenantQuota).where(TenantQuota.tenant == tenant).values(**values, updated_at=utcnow()))
    found = get_quotas(session=session, tenant=tenant)
    assert found is not None  # written just now
    return found


def get_quotas(*, session: Session, tenant: str) -> Quotas | None:
    """The tenant's quotas; None when it has none."""
    row = session.scalars(select(TenantQuota).where(TenantQuota.tenant == tenant)).one_or_none()
    return None if row is None else _quotas(row)


def all_quotas(*, session: Session) -> dict[str, Quotas]:
    """Every tenant's quotas, by tenant name."""
    return {row.tenant: _quotas(row) for row in session.scalars(select(TenantQuota).order_by(TenantQuota.tenant))}


def clear_quotas(*, session: Session, tenant: str) -> bool:
    """Remove every limit of the tenant; False when it had none."""
    return getattr(session.execute(delete(TenantQuota).where(TenantQuota.tenant == tenant)), "rowcount", 0) == 1


@dataclass(frozen=True)
class Used:
    """What a tenant used in the windows containing one instant."""

    live: int  # jobs queued or running: each will make an image
    images: dict[str, int]  # made in the window, by window (day, month)
    gpu_s: dict[str, float]  # billed in the window, by window

    def of(self, quota: str) -> float:
        """What counts against `quota`: images made plus live jobs, or GPU-seconds billed."""
        window = window_of(quota)
        return float(self.images[window] + self.live) if quota in IMAGE_QUOTAS else self.gpu_s[window]


def read_used(*, session: Session, tenant: str, now: datetime) -> Used:
    """The tenant's live jobs and its images and GPU-seconds of today and this month, in one statement
    (one snapshot: a job that ends meanwhile is counted live or made, never both nor neither)."""
    live = count_tenant_jobs(tenant, LIVE).scalar_subquery()

    def summed(column: Any, window: str) -> Any:
        since = window_start(window, now)
        where = (UsageRollup.tenant == tenant, UsageRollup.day >= since)
        return select(func.coalesce(func.sum(column), 0)).where(*where).scalar_subquery()

    row = session.execute(
        select(
            live,
            summed(UsageRollup.images, DAY),
            summed(UsageRollup.images, MONTH),
            summed(UsageRollup.gpu_s, DAY),
            summed(UsageRollup.gpu_s, MONTH),
        )
    ).one()
    return Used(
        live=int(row[0]),
        images={DAY: int(row[1]), MONTH: int(row[2])},
        gpu_s={DAY: float(row[3]), MONTH: float(row[4])},
    )


def _locked_use(session: Session, tenant: str, now: datetime | None) -> tuple[Quotas, Used, datetime] | None:
    """Under the tenant's lock, held until the transaction ends: its quotas and what counts against
    them now; None when it has no quota checked at submission."""
    lock_tenant(session=session, tenant=tenant)
    quotas = get_quotas(session=session, tenant=tenant)
    if quotas is None or not quotas.refuses:
        return None
    now = now or utcnow()
    return quotas, read_used(session=session, tenant=tenant, now=now), now


def refusal(
    quotas: Quotas, used: Used, *, tenant: str, adding: int, now: datetime, lines: tuple[int, ...] = ()
) -> QuotaExceeded | None:
    """The first quota that `adding` more jobs (of `lines`, if only they are refused) would pass,
    as the error to raise; None when all fit."""
    for quota in (*IMAGE_QUOTAS, *GPU_QUOTAS):
        limit = getattr(quotas, quota)
        if limit is None:
            continue
        counted = used.of(quota)
        # Images: exactly what the jobs will make. GPU-seconds are known only after a job ran: refused once spent.
        over = counted + adding > limit if quota in IMAGE_QUOTAS else counted >= limit
        if over:
            resets_at = window_reset(window_of(quota), now)
            return QuotaExceeded(
                tenant=tenant,
                quota=quota,
                limit=limit,
                used=counted,
                requested=adding,
                resets_at=resets_at,
                lines=lines,
            )
    return None


def check_quotas(*, session: Session, tenant: str, adding: int, now: datetime | None = None) -> None:
    """In the transaction that writes `adding` new jobs of `tenant`: take the tenant's lock and
    raise `QuotaExceeded` if they would pass one of its quotas (nothing is written then)."""
    found = _locked_use(session, tenant, now) if adding > 0 else None
    if found is None:
        return
    quotas, used, now = found
    refused = refusal(quotas, used, tenant=tenant, adding=adding, now=now)
    if refused is not None:
        raise refused


def admit_within_quotas(
    *, session: Session, tenant: str, lines: Sequence[int], now: datetime | None = None
) -> tuple[int, QuotaExceeded | None]:
    """In the transaction that writes new jobs of `tenant`, one per row of `lines`, each a request
    of its own (POST /v1/jobs written in a group): take the tenant's lock; how many of the first
    rows fit its quotas, and the refusal of the others (its `lines`; one image asked by each, once
    the first are queued); None when all fit."""
    adding = len(lines)
    found = _locked_use(session, tenant, now) if adding > 0 else None
    if found is None:
        return adding, None
    quotas, used, now = found
    fits = _room(quotas, used)
    if fits is None or fits >= adding:
        return adding, None
    queued = replace(used, live=used.live + fits)  # the first `fits` are queued when the next one is refused
    refused = refusal(quotas, queued, tenant=tenant, adding=1, now=now, lines=tuple(lines[fits:]))
    assert refused is not None  # there was no room for one more
    return fits, refused


def _room(quotas: Quotas, used: Used) -> int | None:
    """How many more jobs fit the quotas (None: no limit): none once a GPU-seconds quota is spent."""
    if any((limit := getattr(quotas, q)) is not None and used.of(q) >= limit for q in GPU_QUOTAS):
        return 0
    left = [int(limit - used.of(q)) for q in IMAGE_QUOTAS if (limit := getattr(quotas, q)) is not None]
    return max(min(left), 0) if left else None


def room(*, session: Session, tenant: str, now: datetime | None = None) -> int | None:
    """How many jobs the tenant may submit now (None: no limit); read without the lock, a hint
    (`check_quotas` and `admit_within_quotas` decide)."""
    quotas = get_quotas(session=session, tenant=tenant)
    if quotas is None or not quotas.refuses:
        return None
    return _room(quotas, read_used(session=session, tenant=tenant, now=now or utcnow()))


def quota_status(
    *, session: Session, tenant: str | None = None, now: datetime | None = None
) -> dict[str, dict[str, dict[str, Any]]]:
    """Per tenant with quotas (or only `tenant`): per quota, its limit, what counts against it and
    when its window resets (`max_running`: jobs running or dispatched now; it has no window)."""
    now = now or utcnow()
    found = all_quotas(session=session) if tenant is None else {tenant: get_quotas(session=session, tenant=tenant)}
    status: dict[str, dict[str, dict[str, Any]]] = {}
    for name, quotas in found.items():
        limits = quotas or Quotas()
        used = read_used(session=session, tenant=name, now=now)
        entry = {
            quota: {
                "limit": getattr(limits, quota),
                "used": round(used.of(quota), 3),
                "resets_at": window_reset(window_of(quota), now).isoformat() + "Z",
            }
            for quota in (*IMAGE_QUOTAS, *GPU_QUOTAS)
        }
        running = jobs_in_flight(session, [name]).get(name, 0)
        entry["max_running"] = {"limit": limits.max_running, "used": running, "resets_at": None}
        status[name] = entry
    return status


def record_refusal(*, sessions: sessionmaker[Session], refused: QuotaExceeded, count: int = 1) -> None:
    """Count `count` refused submissions (for `ipab_quota_refusals_total`), in a transaction of its
    own: the refused one rolled back, or wrote only the jobs that fit."""
    with transaction(sessions) as session:
        key = {"tenant": refused.tenant, "quota": refused.quota}
        dialect = session.get_bind().dialect.name
        stmt = insert_ignoring_duplicates(QuotaRefusal, dialect=dialect, unique=["tenant", "quota"])
        session.execute(stmt.values(**key, refusals=0, last_refused_at=utcnow()))
        session.execute(
            update(QuotaRefusal)
            .where(QuotaRefusal.tenant == refused.tenant, QuotaRefusal.quota == refused.quota)
            .values(refusals=QuotaRefusal.refusals + count, last_refused_at=utcnow())
        )


def retry_within_quotas(*, sessions: sessionmaker[Session], batch_id: str, cap: TenantCap | None = None) -> list[str]:
    """`retry_failed` under the tenant's quotas (and `cap`); a retry a quota refuses is counted
    in `ipab_quota_refusals_total`, as a refused submission is."""
    try:
        return retry_failed(sessions=sessions, batch_id=batch_id, within_quotas=check_quotas, cap=cap)
    except QuotaExceeded as e:
        record_refusal(sessions=sessions, refused=e)
        raise


def refusals(*, session: Session) -> list[tuple[str, str, int]]:
    """(tenant, quota, refusals) of every quota that refused something."""
    stmt = select(QuotaRefusal.tenant, QuotaRefusal.quota, QuotaRefusal.refusals).order_by(
        QuotaRefusal.tenant, QuotaRefusal.quota
    )
    return [(tenant, quota, int(n)) for tenant, quota, n in session.execute(stmt).tuples()]
