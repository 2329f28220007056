"""Reference images are shared by content: one `refs/<sha256>` (and its cached embeddings) serves
every job, batch and tenant that uses the same bytes. Here they are removed once nothing uses them,
and kept while anything might.

What keeps an image: a tenant that uploaded it (`tenant_references`: a tenant's images stay
while the tenant holds them), or a batch that has jobs whose objects are kept
(`batch_references`, written with the jobs). When every job of a batch has had its objects
removed (`batches.removed_count` reached `job_count`), its `batch_references` rows go, and
each image they named is checked.

Removing an image takes two transactions, because deleting objects cannot be part of one:
1. Mark (`reference_images.removing_at`, committed) the images that no tenant holds and no
   batch uses.
2. Hold the marked rows (FOR UPDATE on PostgreSQL; the write lock on SQLite), unmark those
   used meanwhile, delete the objects of the others (`refs/…`, every encoder's
   `embeddings/<encoder>/<sha256>.safetensors`, the Redis copies), then their rows.
A janitor killed in step 2 leaves the rows marked: the next one finishes.

A submission that uses an image takes part (`claim_references`, in its own transaction): it
holds the image's row (KEY SHARE on PostgreSQL, which step 2's FOR UPDATE waits for; the write
lock on SQLite), clears a mark it finds, and returns the images whose objects it must check
again (marked, or whose row is gone): so an image is never removed under a job that uses it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import redis
from sqlalchemy import ColumnElement, delete, exists, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared import keys
from shared.db import (
    SQLITE_ID_CHUNK,
    Batch,
    BatchReference,
    ReferenceImage,
    TenantReference,
    insert_ignoring_duplicates,
)
from shared.db_clock import server_now
from shared.jobs import transaction
from shared.storage import ObjectStore

SCAN_COUNT: Final = 1000  # keys per Redis SCAN step
_RI = ReferenceImage


def _chunks(values: Sequence[str]) -> list[list[str]]:
    return [list(values[i : i + SQLITE_ID_CHUNK]) for i in range(0, len(values), SQLITE_ID_CHUNK)]


def _held() -> ColumnElement[bool]:
    """A tenant holds the image, or a batch (with objects kept) uses it."""
    return or_(
        exists().where(TenantReference.sha256 == _RI.sha256),
        exists().where(BatchReference.sha256 == _RI.sha256),
    )


def claim_references(session: Session, shas: Sequence[str]) -> set[str]:
    """Hold the rows of these images until the session commits; the images to check again.

    Returns those the janitor had marked (the mark is cleared here) or whose row is gone: their
    objects may be partly or wholly deleted, so the caller checks them and uploads them again.
    """
    wanted = sorted(set(shas))
    marked: set[str] = set()
    present: set[str] = set()
    for chunk in _chunks(wanted):
        if session.get_bind().dialect.name == "postgresql":
            stmt = select(_RI.sha256, _RI.removing_at).where(_RI.sha256.in_(chunk)).with_for_update(key_share=True)
            rows = session.execute(stmt).all()
            present.update(sha for sha, _ in rows)
            found = sorted(sha for sha, at in rows if at is not None)
            if found:
                session.execute(update(_RI).where(_RI.sha256.in_(found)).values(removing_at=None))
            marked.update(found)
        else:  # SQLite: the first write takes the database's lock, so the read after it is the truth
            cleared = update(_RI).where(_RI.sha256.in_(chunk), _RI.removing_at.is_not(None))
            marked.update(session.scalars(cleared.values(removing_at=None).returning(_RI.sha256)))
            present.update(session.scalars(select(_RI.sha256).where(_RI.sha256.in_(chunk))))
    return marked | (set(wanted) - present)


def link_references(session: Session, *, batch_id: str, shas: Sequence[str]) -> None:
    """Record that jobs of `batch_id` use these images (kept while the batch keeps any job's objects)."""
    if not shas:
        return
    dialect = session.get_bind().dialect.name
    stmt = insert_ignoring_duplicates(BatchReference, dialect=dialect, unique=["batch_id", "sha256"])
    session.execute(stmt, [{"batch_id": batch_id, "sha256": sha} for sha in sorted(set(shas))])


def mark_unused(session: Session, shas: Sequence[str]) -> int:
    """Step 1: mark the images among `shas` that nothing uses; how many were marked."""
    marked = 0
    for chunk in _chunks(sorted(set(shas))):
        stmt = (
            update(_RI)
            .where(_RI.sha256.in_(chunk), _RI.removing_at.is_(None), ~_held())
            .values(removing_at=server_now())
            .execution_options(synchronize_session=False)
        )
        marked += int(getattr(session.execute(stmt), "rowcount", 0))
    return marked


def unlink_finished_batches(*, sessions: sessionmaker[Session], limit: int) -> tuple[int, bool]:
    """Drop the `batch_references` of batches whose every job's objects are gone, and mark the images
    they named that nothing else uses. Returns (images marked, whether more batches wait)."""
    done = (Batch.job_count > 0, Batch.removed_count >= Batch.job_count)
    linked = exists().where(BatchReference.batch_id == Batch.id)
    with transaction(sessions) as session:
        found = list(session.scalars(select(Batch.id).where(*done, linked).limit(limit)))
        if not found:
            return 0, False
        # Hold the batches, then look again: a submission adding jobs to one of them (it raises
        # `job_count` in its transaction) either committed, or waits for this one.
        session.execute(select(Batch.id).where(Batch.id.in_(found)).with_for_update())
        touch = update(Batch).where(Batch.id.in_(found), *done).values(removed_count=Batch.removed_count)
        finished = list(session.scalars(touch.returning(Batch.id)))
        shas = list(session.scalars(select(BatchReference.sha256).where(BatchReference.batch_id.in_(finished))))
        session.execute(
            delete(BatchReference)
            .where(BatchReference.batch_id.in_(finished))
            .execution_options(synchronize_session=False)
        )
        return mark_unused(session, shas), len(found) == limit


@dataclass(frozen=True)
class RemovedImages:
    """What one removal step did."""

    images: int
    objects: int
    bytes: int
    more: bool


def _embedding_sizes(store: ObjectStore, shas: Sequence[str]) -> dict[str, tuple[str, int]]:
    """object key -> (sha256, size) of every encoder's embedding of these images that exists."""
    found: dict[str, tuple[str, int]] = {}
    for encoder in store.list_folders(keys.EMBEDDINGS_PREFIX):
        for sha in shas:
            key = keys.embedding_key(encoder, sha)
            size = store.size_of(key)
            if size is not None:
                found[key] = (sha, size)
    return found


def _redis_copies(redis_client: redis.Redis, prefix: str, shas: Sequence[str]) -> dict[str, str]:
    """Redis key -> sha256 of the cached embeddings of these images (`emb:<encoder>:<sha256>`)."""
    wanted = set(shas)
    pattern = prefix + keys.EMBED_KEY.format(cache_key="*")
    found: dict[str, str] = {}
    for raw in redis_client.scan_iter(match=pattern, count=SCAN_COUNT):
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
        sha = name.rsplit(":", 1)[-1]
        if sha in wanted:
            found[name] = sha
    return found


def remove_marked(
    *, sessions: sessionmaker[Session], store: ObjectStore, redis_client: redis.Redis, prefix: str, limit: int
) -> RemovedImages:
    """Step 2: delete the objects and rows of marked images that are still unused."""
    with transaction(sessions) as session:
        pending = list(
            session.scalars(
                select(_RI.sha256).where(_RI.removing_at.is_not(None)).order_by(_RI.removing_at).limit(limit)
            )
        )
    if not pending:
        return RemovedImages(0, 0, 0, more=False)
    # Looked up before the rows are held: HEADs and a SCAN are slow next to a held write lock.
    embeddings = _embedding_sizes(store, pending)
    copies = _redis_copies(redis_client, prefix, pending)
    with transaction(sessions) as session:
        session.execute(select(_RI.sha256).where(_RI.sha256.in_(pending)).with_for_update())
        session.execute(
            update(_RI)
            .where(_RI.sha256.in_(pending), _RI.removing_at.is_not(None), _held())
            .values(removing_at=None)
            .execution_options(synchronize_session=False)
        )
        doomed = {
            sha: (key, size)
            for sha, key, size in session.execute(
                select(_RI.sha256, _RI.key, _RI.size_bytes).where(_RI.sha256.in_(pending), _RI.removing_at.is_not(None))
            )
        }
        objects = [key for key, _ in doomed.values()] + [k for k, (sha, _) in embeddings.items() if sha in doomed]
        store.delete_many(objects)
        stale = [name for name, sha in copies.items() if sha in doomed]
        if stale:
            redis_client.delete(*stale)
        session.execute(delete(_RI).where(_RI.sha256.in_(sorted(doomed))).execution_options(synchronize_session=False))
    size = sum(size for _, size in doomed.values()) + sum(s for sha, s in embeddings.values() if sha in doomed)
    return RemovedImages(len(doomed), len(objects), size, more=len(pending) == limit)
