"""A batch's deletion marks the batch at once and its jobs in chunks (`mark_batch_jobs`): no transaction
marks more than a chunk, a reader in between sees the batch deleting and partly marked, every canceled
job is in the usage rollup once, and a deletion that stopped part way converges, asked again or at the
janitor's next pass."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from types import SimpleNamespace
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session, sessionmaker

import shared.janitor.deletions as deletions
from scheduler.api.routes.batches import delete_in
from scheduler.batches.deletion import mark_batch_jobs, request_batch_deletion
from shared.db import Batch, Job, JobStatus, UsageRollup
from shared.jobs import transaction
from tests.scheduler.api.conftest import png_bytes
from tests.scheduler.batches.conftest import insert_mixed_batch
from tests.shared.conftest import World, world

__all__ = ["world"]  # the janitor's test world, on SQLite and PostgreSQL

JOBS = 60
FINISHED = 5  # the first jobs already succeeded: marked, not canceled
RUNNING = 4  # the next ones run on a worker: marked, left to finish
LIVE = JOBS - FINISHED - RUNNING  # queued: canceled and marked
CHUNK = 10


def _batch(sessions: sessionmaker[Session], batch_id: str = "big") -> str:
    """A batch of JOBS jobs: FINISHED succeeded, RUNNING running, the rest queued."""
    with transaction(sessions) as session:
        # lost_gpu_s: an earlier attempt was lost: shown in the usage, never billed
        insert_mixed_batch(
            session, batch_id, name=batch_id, jobs=JOBS, finished=FINISHED, running=RUNNING, lost_gpu_s=1.0
        )
    return batch_id


def _delete(sessions: sessionmaker[Session], batch_id: str = "big") -> int:
    with transaction(sessions) as session:
        request_batch_deletion(session=session, batch_id=batch_id)
    return mark_batch_jobs(sessions=sessions, batch_id=batch_id, chunk=CHUNK, pause_s=0)


def _outcome(sessions: sessionmaker[Session], batch_id: str = "big") -> dict[str, Any]:
    """What a deletion leaves: statuses, jobs marked, and the usage rolled up."""
    in_batch = Job.batch_id == batch_id
    with transaction(sessions) as session:
        statuses = dict(session.execute(select(Job.status, func.count()).where(in_batch).group_by(Job.status)).all())
        marked = session.scalar(select(func.count()).where(in_batch, Job.deleted_at.is_not(None)))
        rolled = session.execute(
            select(func.sum(UsageRollup.jobs), func.sum(UsageRollup.lost_gpu_s)).where(UsageRollup.batch_id == batch_id)
        ).one()
        deleting = session.scalar(select(Batch.deleted_at).where(Batch.id == batch_id)) is not None
    return {"statuses": statuses, "marked": marked, "rolled_up": tuple(rolled), "deleting": deleting}


DONE = {
    "statuses": {JobStatus.succeeded.value: FINISHED, JobStatus.running.value: RUNNING, JobStatus.canceled.value: LIVE},
    "marked": JOBS,
    "rolled_up": (LIVE, pytest.approx(LIVE * 1.0)),  # each canceled job once, its lost second with it
    "deleting": True,
}


@pytest.fixture
def per_transaction(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[int]]:
    """Jobs newly marked by each transaction of a marking from now on."""
    counts: list[int] = []
    real: Callable[..., int] = deletions.mark_jobs

    def counted(*args: Any, **kwargs: Any) -> int:
        marked = real(*args, **kwargs)
        counts.append(marked)
        return marked

    monkeypatch.setattr(deletions, "mark_jobs", counted)
    yield counts


def test_a_batch_is_deleted_a_chunk_of_jobs_per_transaction(
    sessions: sessionmaker[Session], per_transaction: list[int]
) -> None:
    _batch(sessions)
    assert _delete(sessions) == JOBS
    assert per_transaction == [CHUNK] * (JOBS // CHUNK)
    assert _outcome(sessions) == DONE


def test_a_reader_between_two_chunks_sees_the_batch_deleting_and_partly_marked(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    _batch(sessions)
    seen: list[tuple[bool, int]] = []

    def read_between(_pause_s: float) -> None:
        outcome = _outcome(sessions)
        seen.append((outcome["deleting"], outcome["marked"]))

    monkeypatch.setattr(deletions, "time", SimpleNamespace(monotonic=lambda: 0.0, sleep=read_between))
    _delete(sessions)
    assert seen == [(True, marked) for marked in range(CHUNK, JOBS, CHUNK)]


def test_asking_again_changes_nothing_once_done(sessions: sessionmaker[Session], per_transaction: list[int]) -> None:
    _batch(sessions)
    _delete(sessions)
    per_transaction.clear()
    assert _delete(sessions) == 0
    assert per_transaction == [] and _outcome(sessions) == DONE  # read once, nothing to write


def _stopped_after_first_chunk(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch, batch_id: str = "big"
) -> Callable[[], None]:
    """A new batch whose deletion failed in its second transaction (the first chunk committed); the
    returned function lets markings run again."""
    _batch(sessions, batch_id)
    undo = _fail_after_first_chunk(monkeypatch)
    with pytest.raises(RuntimeError):
        _delete(sessions, batch_id)
    return undo


def _fail_after_first_chunk(monkeypatch: pytest.MonkeyPatch) -> Callable[[], None]:
    """From now on, a marking's second transaction fails (and rolls back); the returned function undoes it."""
    real: Callable[..., int] = deletions.mark_jobs
    calls: list[int] = []

    def fails_second(*args: Any, **kwargs: Any) -> int:
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("the process died")
        return real(*args, **kwargs)

    monkeypatch.setattr(deletions, "mark_jobs", fails_second)
    return lambda: monkeypatch.setattr(deletions, "mark_jobs", real)


def test_a_deletion_stopped_after_its_first_chunk_finishes_when_asked_again(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    undo = _stopped_after_first_chunk(sessions, monkeypatch)
    part = _outcome(sessions)
    assert part["deleting"] and part["marked"] == CHUNK  # the first chunk committed; the second rolled back

    undo()
    assert _delete(sessions) == JOBS - CHUNK
    assert _outcome(sessions) == DONE


def test_the_janitor_finishes_a_deletion_stopped_part_way(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    batch_id = "stopped"
    _stopped_after_first_chunk(world.sessions, monkeypatch, batch_id)()

    reports = world.sweep(2)  # IPAB_JANITOR_BATCH is 50: the 50 jobs left are marked in the first pass

    assert [r.jobs_marked for r in reports] == [JOBS - CHUNK, 0]
    left = _outcome(world.sessions, batch_id)  # the finished and canceled jobs are gone; the running ones finish
    assert left["statuses"] == {JobStatus.running.value: RUNNING} and left["marked"] == RUNNING
    assert left["deleting"] and left["rolled_up"] == DONE["rolled_up"]


def test_a_batch_kept_by_a_submission_is_not_marked_further(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    _stopped_after_first_chunk(sessions, monkeypatch)()
    with transaction(sessions) as session:  # as a submission into the batch does (scheduler.submission.submit)
        session.execute(update(Batch).where(Batch.id == "big").values(deleted_at=None))

    assert mark_batch_jobs(sessions=sessions, batch_id="big", chunk=CHUNK, pause_s=0) == 0
    assert _outcome(sessions)["marked"] == CHUNK


def test_the_api_marks_a_deleted_batchs_jobs_in_its_batch_processes(
    client: TestClient, alice: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    image = client.post("/v1/references", headers=alice, files={"file": ("a.png", png_bytes(), "image/png")})
    rows = [{"prompt": f"poster {i}", "references": [image.json()["id"]]} for i in range(3)]
    body = "\n".join(json.dumps(row) for row in rows).encode()
    created = client.post("/v1/batches", headers={**alice, "Content-Type": "application/jsonl"}, content=body)
    batch_id = created.json()["id"]
    processes = client.app.state.ctx.batch_processes  # type: ignore[attr-defined]
    real, calls = processes.call, []

    def recorded(ctx: Any, fn: Callable[..., Any], *args: Any) -> Any:
        calls.append((fn, args))
        return real(ctx, fn, *args)

    monkeypatch.setattr(processes, "call", recorded)
    answer = client.delete(f"/v1/batches/{batch_id}", headers=alice)

    assert answer.status_code == 202 and answer.json() == {"id": batch_id, "status": "deleting"}
    assert calls == [(delete_in, (batch_id,))]  # a batch process's work when `ipab api` started them
    view = client.get(f"/v1/batches/{batch_id}", headers=alice).json()
    assert view["status"] == "deleting" and view["counts"]["canceled"] == 3
