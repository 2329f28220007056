"""Deletion on request: of a job, of a batch, of a whole tenant.

A job's deletion is asked for in one transaction, a batch's in two parts: its row is marked
(`request_batch_deletion`: it reads as deleting at once), then its jobs, in chunks of a short
transaction each (`mark_batch_jobs`, see `shared.janitor.deletions`: one transaction for 99,000
jobs held SQLite's write lock for 3.5 s). Queued jobs are canceled (and counted in the usage
rollup, as any cancel), every job gets `deleted_at` and an expiry of now, and the janitor
(`shared.janitor`), which the face wakes, removes their objects, then their rows (then the
batch's row, once empty). A running job is left to finish first: its worker is never raced. A
marking that stopped part way goes on when asked again, or at the janitor's next pass; asking
again changes nothing else; once done, the job or batch is not found.

A tenant's purge (`ipab tenants delete NAME --purge`) is carried out at once, by the command,
with the janitor's own steps: every row, object, Redis entry, key, webhook secret, outbox row,
idempotency record and plan of the tenant goes; an image (and its embeddings) stays only while
another tenant holds it or a batch of another tenant uses it.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

import redis
from sqlalchemy import Table, delete, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared import keys
from shared.db import (
    ApiKey,
    Base,
    Batch,
    Job,
    JobStatus,
    Plan,
    PlanSlot,
    ReferenceImage,
    Tenant,
    TenantReference,
)
from shared.db_clock import server_now
from shared.errors import MessageInvalid
from shared.janitor.deletions import MARK_CHUNK, MARK_PAUSE_S, mark_in_chunks, mark_jobs
from shared.janitor.outputs import forget_in_redis, purge_deleted_batches, remove_due
from shared.janitor.references import mark_unused, remove_marked
from shared.jobs import transaction
from shared.settings import Settings
from shared.storage import ObjectStore
from shared.wire import decode_envelope

TENANT_COLUMN: Final = "tenant"  # every table with this column holds rows of that tenant
SCAN_COUNT: Final = 1000
# The kinds (`<kind>:...`) of the fleet's Redis keys, whose other parts name model sets, encoders,
# counters or jobs, never a tenant: a tenant named `tiny` (a model set), `embed_cache` or `queued`
# must not take the dispatcher's lock, the cache's counters or every tenant's queued ids with it.
FLEET_KEY_KINDS: Final = frozenset(
    template.split(":", 1)[0]
    for template in (
        keys.QUEUED_SET,
        keys.EMBED_KEY,
        keys.EMBED_LOCK_KEY,
        keys.RECONCILER_LOCK_KEY,
        keys.DISPATCH_LOCK_KEY,
        keys.DISPATCH_WAKE_KEY,
        keys.DISPATCH_SIGNAL_KEY,
        keys.JANITOR_LOCK_KEY,
        keys.JANITOR_SIGNAL_KEY,
        keys.STATS_KEY,
        keys.PROGRESS_KEY,
    )
)
MAX_STEPS: Final = 100_000  # a purge's janitor steps at most (each is bounded): never a loop without end


def _delete(model: type[Base] | Table) -> Any:
    return delete(model).execution_options(synchronize_session=False)


def request_job_deletion(*, session: Session, job_id: str) -> int:
    """Ask for a job's deletion (see the module); how many jobs were newly marked (0: asked already)."""
    return mark_jobs(session, Job.id == job_id, stop_running=False)


def request_batch_deletion(*, session: Session, batch_id: str) -> bool:
    """Ask for a batch's deletion, in the caller's transaction: the batch alone is marked (it reads as
    `deleting` from now on); `mark_batch_jobs` marks its jobs, else the janitor does. False: asked already."""
    result = session.execute(
        update(Batch)
        .where(Batch.id == batch_id, Batch.deleted_at.is_(None))
        .values(deleted_at=server_now())
        .execution_options(synchronize_session=False)
    )
    return int(getattr(result, "rowcount", 0)) > 0


def mark_batch_jobs(
    *, sessions: sessionmaker[Session], batch_id: str, chunk: int = MARK_CHUNK, pause_s: float = MARK_PAUSE_S
) -> int:
    """Cancel and mark the jobs of a batch whose deletion was asked for, `chunk` per transaction (see
    `shared.janitor.deletions`); how many were newly marked. Safe to run again: it goes on where it stopped."""
    return mark_in_chunks(sessions=sessions, only=Batch.id == batch_id, chunk=chunk, pause_s=pause_s)


@dataclass
class TenantPurge:
    """What a tenant's purge did."""

    tenant: str
    batches: int = 0
    jobs: int = 0
    objects_deleted: int = 0
    bytes_deleted: int = 0
    images_removed: int = 0
    images_kept: int = 0  # held or used by another tenant too
    rows: dict[str, int] = field(default_factory=dict)  # rows deleted per table, the tenant-wide ones


def _tenant_batches(tenant: str) -> Any:
    return select(Batch.id).where(Batch.tenant == tenant).scalar_subquery()


def _stop_new_work(session: Session, tenant: str) -> bool:
    """Keys and plans go first (nothing new arrives), and every batch is marked deleted (its jobs are
    canceled and marked next, in chunks). Returns whether some jobs were running."""
    session.execute(_delete(ApiKey).where(ApiKey.tenant == tenant))
    plans = select(Plan.id).where(Plan.tenant == tenant).scalar_subquery()
    session.execute(_delete(PlanSlot).where(PlanSlot.plan_id.in_(plans)))
    session.execute(_delete(Plan).where(Plan.tenant == tenant))
    in_tenant = Job.batch_id.in_(_tenant_batches(tenant))
    running = session.scalar(select(Job.id).where(in_tenant, Job.status == JobStatus.running.value).limit(1))
    session.execute(
        update(Batch)
        .where(Batch.tenant == tenant, Batch.deleted_at.is_(None))
        .values(deleted_at=server_now())
        .execution_options(synchronize_session=False)
    )
    return running is not None


def _tenant_tables() -> list[Table]:
    """Every table with a `tenant` column, children before the tables they refer to."""
    return [t for t in reversed(Base.metadata.sorted_tables) if TENANT_COLUMN in t.c and t.name != "batches"]


def _drop_tenant_rows(session: Session, tenant: str, report: TenantPurge) -> list[str]:
    """The tenant's rows in every table that names it, and its own row; the images it held."""
    held = list(session.scalars(select(TenantReference.sha256).where(TenantReference.tenant == tenant)))
    for table in _tenant_tables():
        result = session.execute(_delete(table).where(table.c[TENANT_COLUMN] == tenant))
        report.rows[table.name] = int(getattr(result, "rowcount", 0))
    session.execute(_delete(Tenant).where(Tenant.name == tenant))
    return held


def _until_done(step: Callable[[], bool]) -> None:
    for _ in range(MAX_STEPS):
        if not step():
            return


def _remove_jobs(c: _Purge) -> None:
    in_tenant = Job.batch_id.in_(_tenant_batches(c.tenant))

    def step() -> bool:
        done = remove_due(
            sessions=c.sessions, store=c.store, redis_client=c.redis, prefix=c.prefix, limit=c.limit, only=in_tenant
        )
        c.report.jobs += done.jobs
        c.report.objects_deleted += done.objects
        c.report.bytes_deleted += done.bytes
        return done.jobs > 0 or done.purged > 0

    _until_done(step)


def _remove_batches(c: _Purge) -> None:
    def step() -> bool:
        batches, objects, size, more = purge_deleted_batches(
            sessions=c.sessions, store=c.store, limit=c.limit, only=Batch.tenant == c.tenant
        )
        c.report.batches += batches
        c.report.objects_deleted += objects
        c.report.bytes_deleted += size
        return more

    _until_done(step)


def _remove_images(c: _Purge, shas: Sequence[str]) -> None:
    def step() -> bool:
        done = remove_marked(sessions=c.sessions, store=c.store, redis_client=c.redis, prefix=c.prefix, limit=c.limit)
        c.report.images_removed += done.images
        c.report.objects_deleted += done.objects
        c.report.bytes_deleted += done.bytes
        return done.more

    _until_done(step)
    with transaction(c.sessions) as session:
        c.report.images_kept = len(
            list(session.scalars(select(ReferenceImage.sha256).where(ReferenceImage.sha256.in_(list(shas)))))
        )


def _names_tenant(name: str, tenant: str, ids: set[str]) -> bool:
    """Whether a Redis key (its prefix taken off) is the tenant's: one of its jobs' or batches' ids
    is a part of it, or the tenant is a part after the kind of a key that is not the fleet's."""
    kind, *rest = name.split(":")
    return bool(ids.intersection(rest)) or (kind not in FLEET_KEY_KINDS and tenant in rest)


def _task_id(message: bytes | str) -> str:
    """The job id of a render queue item (its task id); "" for an item that is not a job message."""
    try:
        return decode_envelope(message).task_id
    except MessageInvalid:
        return ""


def _forget_redis(c: _Purge, job_ids: Sequence[str], batch_ids: Sequence[str]) -> None:
    """What Redis may hold of the tenant: its jobs' entries, keys named after it, its messages in the queues."""
    forget_in_redis(c.redis, prefix=c.prefix, job_ids=job_ids)
    ids = {*job_ids, *batch_ids}
    for raw in c.redis.scan_iter(match=c.prefix + "*", count=SCAN_COUNT):
        name = raw.decode(errors="replace") if isinstance(raw, bytes) else str(raw)
        if _names_tenant(name[len(c.prefix) :], c.tenant, ids):
            c.redis.delete(raw)
    wanted = set(job_ids)  # a set: a queue of thousands of items against a tenant of millions of jobs
    for model_set in c.model_sets:
        queue = keys.render_queue(model_set)
        items: list[Any] = c.redis.lrange(queue, 0, -1)  # bytes, removed as they are (not decoded)
        for message in items:
            if _task_id(message) in wanted:
                c.redis.lrem(queue, 0, message)


@dataclass
class _Purge:
    """One purge's clients and report."""

    tenant: str
    sessions: sessionmaker[Session]
    store: ObjectStore
    redis: redis.Redis
    settings: Settings
    report: TenantPurge
    model_sets: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> str:
        """The Redis prefix."""
        return self.settings.redis_prefix

    @property
    def limit(self) -> int:
        """Jobs or images per step."""
        return self.settings.janitor_batch


def purge_tenant(
    *,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    redis_client: redis.Redis,
    settings: Settings,
    tenant: str,
    on_wait: Callable[[float], None] = lambda _s: None,
) -> TenantPurge:
    """Delete everything of `tenant` (see the module). Running it again finishes a purge that was stopped.

    When jobs of the tenant were running, waits IPAB_LEASE_S (`on_wait` is told first) for
    their workers to notice the cancel and stop writing.
    """
    c = _Purge(tenant, sessions, store, redis_client, settings, TenantPurge(tenant))
    # 1. Nothing new: keys and plans go, batches are marked deleted, then their jobs canceled and marked.
    with transaction(sessions) as session:
        batch_ids = list(session.scalars(select(Batch.id).where(Batch.tenant == tenant)))
        job_ids = list(session.scalars(select(Job.id).where(Job.batch_id.in_(batch_ids)))) if batch_ids else []
        c.model_sets = sorted(set(session.scalars(select(Batch.model_set).where(Batch.tenant == tenant))))
        running = _stop_new_work(session, tenant)
    mark_in_chunks(sessions=sessions, only=Batch.tenant == tenant, stop_running=True)
    if running:
        on_wait(settings.lease_s)
        time.sleep(settings.lease_s)
    # 2. The janitor's steps, on the tenant's jobs and batches: objects, then rows.
    _remove_jobs(c)
    _remove_batches(c)
    # 3. The tenant's rows everywhere else; the images it held are checked like any other.
    with transaction(sessions) as session:
        held = _drop_tenant_rows(session, tenant, c.report)
        mark_unused(session, held)
    _remove_images(c, held)
    # 4. Redis.
    _forget_redis(c, job_ids, batch_ids)
    return c.report
