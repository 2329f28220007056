"""Per-tenant caps that hold under concurrency: the count and the insert in one transaction,
under the tenant's lock.

A cap checked on a count read before the transaction that inserts lets concurrent
submissions each see room and together pass it (issue 21: eight 10-row batches under a cap
of 10 left 60 jobs queued). Here the submit path calls `room_for` inside its writing
transaction: it takes the tenant's lock, held until that transaction commits or rolls back,
and counts after it; a second submission of the tenant waits at the lock and counts what
the first one committed.

The lock (`lock_tenant`), on each database:
- PostgreSQL: `pg_advisory_xact_lock` on a number derived from the tenant's name; it needs
  no row (a CLI tenant has none) and blocks nobody else.
- SQLite: one writer at a time for the whole file, across processes. pysqlite opens the
  transaction at its first write, not at its first read, so the lock is a write (an UPDATE
  of the tenant's row, changing nothing, that takes the write lock even when no row
  matches): from there to the commit, no other connection writes, and what is counted after
  it is the latest.

The queued-jobs cap of the API (IPAB_API_MAX_QUEUED_JOBS) counts with it; quotas that turn
usage into limits take the same lock before they count.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Final

from sqlalchemy import Select, func, select, text, update
from sqlalchemy.orm import Session

from shared.db import Batch, Job, JobStatus, Tenant
from shared.errors import CapReached

QUEUED_JOBS: Final = "queued job(s)"
QUEUED_JOBS_SETTING: Final = "IPAB_API_MAX_QUEUED_JOBS"
_PG_LOCK: Final = text("SELECT pg_advisory_xact_lock(:key)")


@dataclass(frozen=True)
class TenantCap:
    """A limit on what a tenant holds, counted in SQL: what (for messages), its setting, its maximum, the count."""

    what: str
    setting: str
    maximum: int
    count: Callable[[Session, str], int]


def lock_key(tenant: str) -> int:
    """The tenant's advisory lock number on PostgreSQL: 64 bits of a sha256 of its name (a
    collision only makes two tenants take turns)."""
    digest = hashlib.sha256(f"ipab-tenant:{tenant}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def lock_tenant(*, session: Session, tenant: str) -> None:
    """Hold the tenant's lock until the session's transaction ends (see the module's docstring)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(_PG_LOCK, {"key": lock_key(tenant)})
    else:
        stmt = update(Tenant).where(Tenant.name == tenant).values(lanes=Tenant.lanes)
        session.execute(stmt.execution_options(synchronize_session=False))


def count_tenant_jobs(tenant: str, statuses: Collection[str]) -> Select[int]:
    """SELECT how many of the tenant's jobs have one of `statuses`: an index range per batch of the tenant.

    Not a join: SQLite walked the status index of the join, every queued job of every tenant
    (50 ms for a tenant with one job beside another's 99,000, on every submission).
    """
    batches = select(Batch.id).where(Batch.tenant == tenant)
    return select(func.count()).select_from(Job).where(Job.batch_id.in_(batches), Job.status.in_(list(statuses)))


def queued_jobs(session: Session, tenant: str) -> int:
    """How many of the tenant's jobs are queued."""
    return int(session.scalar(count_tenant_jobs(tenant, [JobStatus.queued.value])) or 0)


def queued_jobs_cap(maximum: int) -> TenantCap:
    """The cap on a tenant's queued jobs (the API's IPAB_API_MAX_QUEUED_JOBS)."""
    return TenantCap(QUEUED_JOBS, QUEUED_JOBS_SETTING, maximum, queued_jobs)


def held_under_lock(*, session: Session, tenant: str, cap: TenantCap) -> int:
    """In the transaction that will add to it: take the tenant's lock, then count what `cap`
    limits. The count stays true until that transaction ends: nobody else can add meanwhile."""
    lock_tenant(session=session, tenant=tenant)
    return cap.count(session, tenant)


def refusal(*, tenant: str, cap: TenantCap, held: int, adding: int, lines: tuple[int, ...] = ()) -> CapReached:
    """The error for `adding` more (the rows of `lines`, when only some are refused) when `held` are held."""
    return CapReached(
        tenant=tenant, cap=cap.what, setting=cap.setting, held=held, adding=adding, maximum=cap.maximum, lines=lines
    )
