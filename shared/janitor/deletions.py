"""The jobs of a deleted batch, marked in chunks: canceled when queued, and due at once.

A batch's deletion (or a tenant's purge) marks its batch first (`batches.deleted_at`: one short
statement; it reads as `deleting` from then on), then its jobs, at most `MARK_CHUNK` per
transaction: a chunk's queued jobs (and running ones, for a purge) are canceled and added to the
usage rollup (`shared.usage.roll_up_ended`: their lost seconds are shown as any cancel's), and
each job gets `deleted_at` and an expiry of now, which makes it due for the janitor's removal
(`shared.janitor.outputs`); one whose objects went on expiry already keeps its expiry and is
left for the janitor to delete its row (`DataState.purging`). A running job is left to finish
(its worker is never raced): it expires as it does. One transaction for the 99,000 jobs of a
batch held SQLite's write lock for 3.5 s, and every other tenant's writes waited (measured); a
chunk holds it some 30 ms, and the pause after it is as long (the writers that waited go first).

The jobs to mark are read once, before the chunks and outside their transactions: a chunk that
looked them up again would read past the rows marked already, the whole batch again at its end.
Every UPDATE of a chunk is conditional (the batch still deleted, the job not marked yet), so a
marking converges: one that stopped part way (its process died, the database went away) goes on
where it stopped when asked again, and the janitor finishes it anyway (`mark_chunk`, one chunk a
pass). A submission into the batch meanwhile keeps it (it clears `deleted_at`), and with it the
jobs not marked yet.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Final

from sqlalchemy import ColumnElement, and_, case, func, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared.db import Batch, Job, JobStatus, serialized_writes
from shared.db_clock import server_now
from shared.jobs import lease_on_cancel, transaction
from shared.retention import DataState
from shared.usage import roll_up_ended

MARK_CHUNK: Final = 1000  # jobs per transaction: some 30 ms of SQLite's write lock, as a cancel's chunk
MARK_PAUSE_S: Final = 0.005  # at least this long between two of them


def _stopped(stop_running: bool) -> list[str]:
    """The statuses a deletion cancels: queued; running too for a purge (its worker stops at its next step)."""
    return [JobStatus.queued.value, *([JobStatus.running.value] if stop_running else [])]


def _unmarked(only: ColumnElement[bool] | None, *, stop_running: bool, by_id: bool = False) -> ColumnElement[bool]:
    """Jobs of deleted batches (those `only` selects, when given) not marked yet, or still to cancel.

    `by_id`: for a statement that names its jobs (`Job.id IN (...)`); the batch is then checked per
    job, so that SQLite looks the jobs up by id: given `batch_id IN (SELECT ...)`, it read every job
    of the batch through the batch's index instead, in each chunk (23 ms a chunk of 20,000 jobs), and
    given `status IN (...)`, every queued job of every tenant (so `mark_jobs` writes `status || ''`).
    SQLite has no statistics to tell it better.
    """
    batches = select(Batch.id).where(Batch.deleted_at.is_not(None))
    if only is not None:
        batches = batches.where(only)
    in_deleted = (
        batches.where(Batch.id == Job.batch_id).exists() if by_id else Job.batch_id.in_(batches.scalar_subquery())
    )
    return and_(in_deleted, or_(Job.deleted_at.is_(None), Job.status.in_(_stopped(stop_running))))


def mark_jobs(session: Session, where: ColumnElement[bool], *, stop_running: bool) -> int:
    """In the caller's transaction: cancel the jobs `where` selects (at most a chunk of them) that are
    queued (or running, when `stop_running`), with their usage, and mark every one deleted with an
    expiry of now; how many were newly marked (for a purge, with the running ones it stopped that
    were marked already).

    Each row is written once (two UPDATEs of the same rows held the write lock twice as long): the
    canceled ones are marked with their cancel, then the others that are not marked yet.
    """
    now = server_now()
    canceled = list(
        session.scalars(
            update(Job)
            .where(where, Job.status.concat("").in_(_stopped(stop_running)))  # see `_unmarked`: by id
            .values(
                status=JobStatus.canceled.value,
                finished_at=now,
                lease_expires_at=lease_on_cancel(),  # a running one's worker reports its steps
                # A running job a purge stops may be marked already: it keeps its deletion's time and expiry.
                deleted_at=func.coalesce(Job.deleted_at, now),
                expires_at=case((Job.deleted_at.is_(None), now), else_=Job.expires_at),
            )
            .returning(Job.id)
            .execution_options(synchronize_session=False)
        )
    )
    if canceled:  # counted as they end, as any cancel (a running one's steps come from its worker)
        roll_up_ended(session, Job.id.in_(canceled))
    removed = Job.data_state == DataState.removed.value  # its objects went on expiry: its row alone is left
    result = session.execute(
        update(Job)
        .where(where, Job.deleted_at.is_(None))
        .values(
            deleted_at=now,
            expires_at=case((removed, Job.expires_at), else_=now),
            data_state=case((removed, DataState.purging.value), else_=Job.data_state),
        )
        .execution_options(synchronize_session=False)
    )
    return len(canceled) + int(getattr(result, "rowcount", 0))


def _mark_ids(
    sessions: sessionmaker[Session], ids: Sequence[str], only: ColumnElement[bool] | None, *, stop_running: bool
) -> int:
    """One transaction: `ids`, re-checked (they may have been marked, or their batch kept, since they were read)."""
    with serialized_writes(sessions), transaction(sessions) as session:
        return mark_jobs(
            session,
            and_(Job.id.in_(ids), _unmarked(only, stop_running=stop_running, by_id=True)),
            stop_running=stop_running,
        )


def mark_chunk(
    *, sessions: sessionmaker[Session], limit: int, only: ColumnElement[bool] | None = None, stop_running: bool = False
) -> tuple[int, bool]:
    """Up to `limit` jobs of deleted batches (among `only`) marked (the janitor's step, finishing a
    marking that stopped); (how many newly marked, whether there may be more). Its look-up reads the
    jobs of deleted batches that are not removed yet (0.1 s for 99,000 on SQLite): a read, which no
    writer waits for."""
    with transaction(sessions) as session:  # read apart: no write waits for this look-up
        ids = list(session.scalars(select(Job.id).where(_unmarked(only, stop_running=stop_running)).limit(limit)))
    marked = _mark_ids(sessions, ids, only, stop_running=stop_running) if ids else 0
    return marked, len(ids) == limit


def mark_in_chunks(
    *,
    sessions: sessionmaker[Session],
    only: ColumnElement[bool],
    stop_running: bool = False,
    chunk: int = MARK_CHUNK,
    pause_s: float = MARK_PAUSE_S,
) -> int:
    """Mark every job of the deleted batches `only` selects, `chunk` per transaction; how many were newly marked.

    Between two transactions the write lock is free (`pause_s`, or as long as the last one took): a
    reader in between sees the batch partly marked, and a queued job a worker takes meanwhile is
    left to finish (it is marked, not canceled, by its chunk). See the module on convergence.
    """
    with transaction(sessions) as session:
        ids = list(session.scalars(select(Job.id).where(_unmarked(only, stop_running=stop_running))))
    marked = 0
    for start in range(0, len(ids), chunk):
        began = time.monotonic()
        marked += _mark_ids(sessions, ids[start : start + chunk], only, stop_running=stop_running)
        if start + chunk < len(ids):
            time.sleep(max(pause_s, time.monotonic() - began))
    return marked
