"""Finding a batch or a job: by id or name, within a tenant when one is given.

A tenant's look-up filters on the tenant in the same query, so another tenant's batch reads
exactly like one that does not exist (`NotFound` either way).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from shared.db import Batch, Job
from shared.errors import NotFound
from shared.jobs import transaction

T = TypeVar("T")


def find_batch(*, session: Session, ref: str, tenant: str | None = None) -> Batch:
    """The batch whose id or name is `ref` (the tenant's, when `tenant` is given); `NotFound` otherwise."""
    stmt = select(Batch).where(or_(Batch.id == ref, Batch.name == ref))
    if tenant is not None:
        stmt = stmt.where(Batch.tenant == tenant)
    # An id matches before a name (a name may look like another batch's id).
    batches = sorted(session.scalars(stmt.limit(2)), key=lambda b: b.id != ref)
    if not batches:
        raise NotFound("batch", ref)
    return batches[0]


def find_job(*, session: Session, job_id: str, tenant: str | None = None) -> tuple[Job, Batch]:
    """The job with this id and its batch (the tenant's, when `tenant` is given); `NotFound` otherwise."""
    stmt = select(Job, Batch).join(Batch, Batch.id == Job.batch_id).where(Job.id == job_id)
    if tenant is not None:
        stmt = stmt.where(Batch.tenant == tenant)
    row = session.execute(stmt).one_or_none()
    if row is None:
        raise NotFound("job", job_id)
    return row[0], row[1]


def on_batch(sessions: sessionmaker[Session], *, ref: str, tenant: str | None, act: Callable[[Session, Batch], T]) -> T:
    """`act(session, batch)` on the batch `ref` names, found as `find_batch` finds it, in one transaction."""
    with transaction(sessions) as session:
        return act(session, find_batch(session=session, ref=ref, tenant=tenant))


def on_job(
    sessions: sessionmaker[Session], *, job_id: str, tenant: str | None, act: Callable[[Session, Job, Batch], T]
) -> T:
    """`act(session, job, batch)` on the job, found as `find_job` finds it, in one transaction."""
    with transaction(sessions) as session:
        return act(session, *find_job(session=session, job_id=job_id, tenant=tenant))
