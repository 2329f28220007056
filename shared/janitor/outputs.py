"""A job's objects after its expiry, and its row after the metadata's retention or its deletion.

A job is due when it is final (queued and running jobs never are: a job that runs past its
expiry is removed once it finishes) and its `expires_at` has passed. Its removal:
1. mark it `removing` (committed) — from here a record says what is happening;
2. delete every attempt's object (`outputs/<batch>/<job>.<attempt>.png`, one S3 request for a
   whole step's jobs);
3. mark it `removed` with the time, or, when its deletion was asked for, delete its row (with
   its webhook subscription and outbox rows), and count it in its batch's `removed_count`.
A job whose deletion is asked for after its objects went is marked `purging`: its row goes at
the janitor's next step, uncounted (its batch counted it when it was removed).
A janitor that dies between 1 and 3 leaves the job `removing`; the next one does 2 and 3 again
(deleting a missing object is no error), so no object outlives its record unremarked.

Rows whose objects were removed are deleted IPAB_RETENTION_METADATA_S after their expiry (kept
for ever when unset), and a batch's row goes once it has no job left, deleted or all past that
retention (with whatever its folder still holds: objects of attempts whose worker died before
tidying up).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final, cast

import redis
from sqlalchemy import ColumnElement, Table, and_, bindparam, case, delete, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared import keys
from shared.db import (
    SQLITE_ID_CHUNK,
    TERMINAL,
    Base,
    Batch,
    BatchReference,
    Job,
    PlanSlot,
    WebhookMessage,
    WebhookSubscription,
)
from shared.db_clock import server_now
from shared.janitor.references import mark_unused
from shared.jobs import transaction
from shared.retention import DataState
from shared.step_progress import progress_key
from shared.storage import ObjectStore

FINAL: Final = tuple(sorted(s.value for s in TERMINAL))
_BATCHES = cast(Table, Batch.__table__)
DELETED_BATCH_REASON: Final = "its batch was deleted"
EXPIRED_BATCH_REASON: Final = "its batch's records passed their retention"


@dataclass(frozen=True)
class Doomed:
    """A job whose objects are being removed."""

    job_id: str
    batch_id: str
    attempts: int
    output_bytes: int | None
    deleted: bool  # its deletion was asked for: its row goes too

    def object_keys(self) -> list[str]:
        """Every key an attempt of the job may have written."""
        return [keys.output_key(self.batch_id, self.job_id, n) for n in range(1, self.attempts + 1)]


@dataclass(frozen=True)
class Removal:
    """What one removal step did."""

    jobs: int
    purged: int
    objects: int
    bytes: int
    more: bool


# The deletion's time, not `deleted_at IS NOT NULL`: SQLite's UPDATE ... RETURNING gave 1 for that on NULL.
_DOOMED_COLUMNS = (Job.id, Job.batch_id, Job.attempts, Job.output_bytes, Job.deleted_at)


def _doomed(rows: Sequence[tuple[str, str, int, int | None, datetime | None]]) -> list[Doomed]:
    return [
        Doomed(job_id, batch_id, attempts, size, deleted is not None)
        for job_id, batch_id, attempts, size, deleted in rows
    ]


def due() -> ColumnElement[bool]:
    """A job whose objects are kept, that is final and whose expiry has passed (the server's clock)."""
    return and_(
        Job.data_state.is_(None),
        Job.expires_at.is_not(None),
        Job.expires_at <= server_now(),
        Job.status.in_(FINAL),
    )


def mark_removing(
    *, sessions: sessionmaker[Session], limit: int, only: ColumnElement[bool] | None = None
) -> list[Doomed]:
    """Step 1: mark up to `limit` due jobs (among `only`, when given) `removing`, oldest expiry first."""
    where = due() if only is None else and_(due(), only)
    with transaction(sessions) as session:
        ids = list(session.scalars(select(Job.id).where(where).order_by(Job.expires_at).limit(limit)))
        if not ids:
            return []
        stmt = (
            update(Job)
            .where(Job.id.in_(ids), due())
            .values(data_state=DataState.removing.value)
            .returning(*_DOOMED_COLUMNS)
            .execution_options(synchronize_session=False)
        )
        return _doomed(session.execute(stmt).tuples().all())


def left_removing(
    *, sessions: sessionmaker[Session], limit: int, only: ColumnElement[bool] | None = None
) -> list[Doomed]:
    """Jobs a janitor marked `removing` and did not finish (it died, or works now: finishing them
    twice is harmless, every step is conditional): they are finished first."""
    stmt = select(*_DOOMED_COLUMNS).where(Job.data_state == DataState.removing.value, Job.expires_at.is_not(None))
    if only is not None:
        stmt = stmt.where(only)
    with transaction(sessions) as session:
        return _doomed(session.execute(stmt.limit(limit)).tuples().all())


def delete_objects(store: ObjectStore, doomed: Sequence[Doomed]) -> tuple[int, int]:
    """Step 2: delete every attempt's object of these jobs; (recorded outputs, their bytes) deleted."""
    store.delete_many([key for job in doomed for key in job.object_keys()])
    recorded = [job.output_bytes for job in doomed if job.output_bytes is not None]
    return len(recorded), sum(recorded)


def purge_rows(session: Session, job_ids: Sequence[str]) -> int:
    """Delete these jobs' rows with their webhook subscriptions and outbox rows; how many jobs went."""
    return len(_purge_rows(session, job_ids, Job.id.is_not(None)))


def _purge_rows(session: Session, job_ids: Sequence[str], condition: ColumnElement[bool]) -> list[tuple[str, str]]:
    """(id, batch id) of the rows among `job_ids` meeting `condition` deleted, with their webhook rows."""
    gone: list[tuple[str, str]] = []
    for start in range(0, len(job_ids), SQLITE_ID_CHUNK):
        ids = list(job_ids[start : start + SQLITE_ID_CHUNK])
        session.execute(_delete(WebhookMessage).where(WebhookMessage.subject_id.in_(ids)))
        session.execute(_delete(WebhookSubscription).where(WebhookSubscription.subject_id.in_(ids)))
        stmt = _delete(Job).where(Job.id.in_(ids), condition).returning(Job.id, Job.batch_id)
        gone.extend((job_id, batch_id) for job_id, batch_id in session.execute(stmt))
    return gone


def _delete(model: type[Base]) -> Any:
    """A DELETE that leaves the session's objects alone (nothing reads them after)."""
    return delete(model).execution_options(synchronize_session=False)


def forget_in_redis(redis_client: redis.Redis, *, prefix: str, job_ids: Sequence[str]) -> None:
    """Drop what Redis may still hold of these jobs (the queued set's ids, progress); best effort."""
    if not job_ids:
        return
    try:
        pipe = redis_client.pipeline(transaction=False)
        pipe.srem(prefix + keys.QUEUED_SET, *job_ids)
        pipe.delete(*(progress_key(prefix, job_id) for job_id in job_ids))
        pipe.execute()
    except redis.RedisError:
        pass  # the set is the reconciler's mirror and progress expires: neither outlives a lease for long


def finish_removal(*, sessions: sessionmaker[Session], doomed: Sequence[Doomed]) -> tuple[int, list[str]]:
    """Step 3: mark the jobs `removed` (or delete the rows of deleted ones) and count them in their
    batches; only rows still `removing` count (a janitor finishing the same jobs at once counts none
    twice). Returns (jobs finished, ids of the rows deleted)."""
    kept = [job.job_id for job in doomed if not job.deleted]
    gone = [job.job_id for job in doomed if job.deleted]
    removing = Job.data_state == DataState.removing.value
    with transaction(sessions) as session:
        finished = list(
            session.scalars(
                update(Job)
                .where(Job.id.in_(kept), removing)
                .values(
                    # deleted since step 1 read it: its row goes next (`purge_deleted_removed`), uncounted
                    data_state=case((Job.deleted_at.is_(None), DataState.removed.value), else_=DataState.purging.value),
                    data_removed_at=server_now(),
                )
                .returning(Job.batch_id)
                .execution_options(synchronize_session=False)
            )
        )
        purged = _purge_rows(session, gone, removing)
        finished += [batch_id for _, batch_id in purged]
        per_batch = Counter(finished)
        if per_batch:
            session.execute(
                update(_BATCHES)
                .where(_BATCHES.c.id == bindparam("b_id"))
                .values(removed_count=_BATCHES.c.removed_count + bindparam("b_n")),
                [{"b_id": batch_id, "b_n": n} for batch_id, n in sorted(per_batch.items())],
            )
    return len(finished), [job_id for job_id, _ in purged]


def purge_deleted_removed(
    *,
    sessions: sessionmaker[Session],
    redis_client: redis.Redis,
    prefix: str,
    limit: int,
    only: ColumnElement[bool] | None = None,
) -> tuple[int, bool]:
    """Delete up to `limit` rows of jobs (among `only`) whose objects went on expiry before their
    deletion was asked for (`DataState.purging`): nothing is left in the store, and their batches
    counted them when they were removed. Returns (rows deleted, whether more wait)."""
    purging = and_(Job.data_state == DataState.purging.value, Job.expires_at.is_not(None))  # the partial index
    with transaction(sessions) as session:
        ids = list(session.scalars(select(Job.id).where(purging if only is None else and_(purging, only)).limit(limit)))
        gone = [job_id for job_id, _ in _purge_rows(session, ids, purging)]
    forget_in_redis(redis_client, prefix=prefix, job_ids=gone)
    return len(gone), len(ids) == limit


def remove_due(
    *,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    redis_client: redis.Redis,
    prefix: str,
    limit: int,
    only: ColumnElement[bool] | None = None,
) -> Removal:
    """Delete the rows of deleted jobs whose objects went already, then finish the jobs left
    `removing`, else remove up to `limit` due jobs' objects (steps 1 to 3); only among the jobs
    `only` selects, when given."""
    purged, more = purge_deleted_removed(
        sessions=sessions, redis_client=redis_client, prefix=prefix, limit=limit, only=only
    )
    doomed = left_removing(sessions=sessions, limit=limit, only=only) or mark_removing(
        sessions=sessions, limit=limit, only=only
    )
    if not doomed:
        return Removal(0, purged, 0, 0, more=more)
    objects, size = delete_objects(store, doomed)
    finished, gone = finish_removal(sessions=sessions, doomed=doomed)
    forget_in_redis(redis_client, prefix=prefix, job_ids=gone)
    return Removal(finished, purged + len(gone), objects, size, more=more or len(doomed) == limit)


def purge_past_retention(
    *, sessions: sessionmaker[Session], redis_client: redis.Redis, prefix: str, retention_s: float, limit: int
) -> tuple[int, list[str], bool]:
    """Delete up to `limit` rows whose objects were removed and whose expiry is `retention_s` past;
    (rows deleted, their batches' ids, whether more wait)."""
    old = and_(
        Job.data_state == DataState.removed.value,
        Job.expires_at.is_not(None),
        Job.expires_at <= server_now(-retention_s),
    )
    with transaction(sessions) as session:
        ids = list(session.scalars(select(Job.id).where(old).order_by(Job.expires_at).limit(limit)))
        gone = _purge_rows(session, ids, Job.id.is_not(None))
    forget_in_redis(redis_client, prefix=prefix, job_ids=ids)
    return len(gone), sorted({batch_id for _, batch_id in gone}), len(ids) == limit


def _leftovers(store: ObjectStore, session: Session, batch_id: str) -> dict[str, int]:
    """Objects in the batch's folder that belong to no job row (the folder of a batch with none: all)."""
    found = store.list_sizes(keys.outputs_prefix(batch_id))
    owners = {key: key.rsplit("/", 1)[-1].split(".", 1)[0] for key in found}
    ids = sorted(set(owners.values()))
    live: set[str] = set()
    for start in range(0, len(ids), SQLITE_ID_CHUNK):
        live.update(session.scalars(select(Job.id).where(Job.id.in_(ids[start : start + SQLITE_ID_CHUNK]))))
    return {key: size for key, size in found.items() if owners[key] not in live}


def purge_deleted_batches(
    *,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    limit: int,
    only: ColumnElement[bool] | None = None,
    past_retention: bool = False,
) -> tuple[int, int, int, bool]:
    """Delete batches (among `only`, when given) that have no job left: deleted ones, and with
    `past_retention` those whose every job's row went past the metadata's retention (`only` then
    names the batches whose last rows just went: the janitor does not scan every batch for them),
    with what their folders still hold. Returns
    (batches, objects, bytes, whether more wait). Each batch is held and looked at again before its
    row goes: a submission into it meanwhile keeps it (it clears `deleted_at`, adds to `job_count`).
    """
    gone: ColumnElement[bool] = Batch.deleted_at.is_not(None)
    if past_retention:
        gone = or_(gone, and_(Batch.job_count > 0, Batch.removed_count >= Batch.job_count))
    empty = and_(gone, ~select(Job.id).where(Job.batch_id == Batch.id).exists())
    with transaction(sessions) as session:
        found = list(session.scalars(select(Batch.id).where(empty if only is None else and_(empty, only)).limit(limit)))
    batches = objects = size = 0
    for batch_id in found:
        with transaction(sessions) as session:
            leftovers = _leftovers(store, session, batch_id)
        store.delete_many(sorted(leftovers))
        objects, size = objects + len(leftovers), size + sum(leftovers.values())
        with transaction(sessions) as session:
            batches += _purge_batch(session, batch_id, empty)
    return batches, objects, size, len(found) == limit


def _purge_batch(session: Session, batch_id: str, empty: ColumnElement[bool]) -> int:
    session.execute(select(Batch.id).where(Batch.id == batch_id).with_for_update())
    touch = update(Batch).where(Batch.id == batch_id, empty).values(deleted_at=Batch.deleted_at)
    if not list(session.scalars(touch.returning(Batch.id))):
        return 0
    shas = list(session.scalars(select(BatchReference.sha256).where(BatchReference.batch_id == batch_id)))
    session.execute(_delete(BatchReference).where(BatchReference.batch_id == batch_id))
    session.execute(_delete(WebhookMessage).where(WebhookMessage.subject_id == batch_id))
    session.execute(_delete(WebhookSubscription).where(WebhookSubscription.subject_id == batch_id))
    deleted = session.scalar(select(Batch.deleted_at.is_not(None)).where(Batch.id == batch_id))
    reason = DELETED_BATCH_REASON if deleted else EXPIRED_BATCH_REASON
    session.execute(
        update(PlanSlot)
        .where(PlanSlot.batch_id == batch_id)
        .values(batch_id=None, reason=func.coalesce(PlanSlot.reason, reason))
        .execution_options(synchronize_session=False)
    )
    session.execute(_delete(Batch).where(Batch.id == batch_id))
    mark_unused(session, shas)
    return 1


def oldest_due_age_s(*, sessions: sessionmaker[Session]) -> float:
    """How long ago the oldest expiry not yet acted on passed (0: nothing waits): the janitor's lag."""
    waiting = (
        or_(Job.data_state.is_(None), Job.data_state == DataState.removing.value),
        Job.expires_at.is_not(None),
        Job.expires_at <= server_now(),
        Job.status.in_(FINAL),
    )
    with transaction(sessions) as session:
        oldest = session.scalar(select(func.min(Job.expires_at)).where(*waiting))
        now = session.scalar(select(server_now()))
    if oldest is None or now is None:
        return 0.0
    return max(0.0, float((now - oldest).total_seconds()))
