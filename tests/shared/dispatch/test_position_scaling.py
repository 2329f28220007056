"""A queue position reads what grows with its own tenant, not with every tenant's backlog: the jobs
ahead of it are counted per batch of its tenant, and the backlog counts of all tenants come from a
snapshot shared by the process's forecasts (`BacklogSnapshots`), read again in the background."""

from __future__ import annotations

import json
import threading
import uuid
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import pytest
from sqlalchemy import event, insert, select, text, tuple_
from sqlalchemy.orm import Session, sessionmaker

from scheduler.batches.limits import queued_jobs
from shared.db import Batch, Job, Tenant, utcnow
from shared.dispatch.dispatcher import Key, backlog_counts
from shared.dispatch.position import BacklogSnapshots, _ahead_in_key, forecast_job
from shared.jobs import transaction
from shared.settings import Settings

STATUS_INDEX = "ix_jobs_status_lease_expires_at"  # every queued job of every tenant: what a count must not walk


@pytest.fixture
def database_url(sqlite_url: str) -> str:
    """SQLite only: the query plans these tests read are SQLite's (the root conftest's `sessions` use it)."""
    return sqlite_url


def _add_batch(
    sessions: sessionmaker[Session], tenant: str, jobs: int, *, age_s: int, lane: str = "bulk", **batch: Any
) -> str:
    batch_id = f"{tenant}-{uuid.uuid4().hex[:8]}"
    created = utcnow() - timedelta(seconds=age_s)
    with transaction(sessions) as session:
        if session.get(Tenant, tenant) is None:
            session.execute(insert(Tenant).values(name=tenant, webhook_secret="s"))
        session.add(Batch(id=batch_id, name=batch_id, model_set="m", tenant=tenant, created_at=created, **batch))
        session.flush()
        spec = json.dumps({"params": {}, "references": []})
        rows = [
            {"id": f"{batch_id}-{i}", "batch_id": batch_id, "line": i, "lane": lane, "dedupe_key": str(i)}
            | {"spec": spec, "seed": i, "queued_at": created}
            for i in range(jobs)
        ]
        if rows:
            session.execute(insert(Job), rows)
    return batch_id


def _ahead(sessions: sessionmaker[Session], job_id: str) -> int:
    with transaction(sessions) as session:
        job, batch = session.execute(select(Job, Batch).join(Batch).where(Job.id == job_id)).one()
        before = tuple_(Job.queued_at, Job.line) < tuple_(job.queued_at, job.line)
        key = (job.lane, batch.tenant)
        return _ahead_in_key(session, model_set="m", key=key, batch=batch, before=before)


def test_the_jobs_ahead_in_a_key_are_those_of_older_unpaused_batches_then_earlier_lines(
    sessions: sessionmaker[Session],
) -> None:
    older = _add_batch(sessions, "calm", 3, age_s=30)
    _add_batch(sessions, "calm", 4, age_s=20, paused=True)  # waits: nothing of it starts first
    _add_batch(sessions, "calm", 5, age_s=25, lane="interactive")  # another key
    _add_batch(sessions, "hostile", 50, age_s=40)  # another tenant, older
    mine = _add_batch(sessions, "calm", 6, age_s=10)
    _add_batch(sessions, "calm", 2, age_s=5)  # newer: after it
    with transaction(sessions) as session:  # one of the older batch's jobs was handed to Redis already
        session.execute(text("UPDATE jobs SET enqueued_at = CURRENT_TIMESTAMP WHERE id = :id"), {"id": f"{older}-0"})

    assert _ahead(sessions, f"{mine}-0") == 2
    assert _ahead(sessions, f"{mine}-4") == 2 + 4


def _plans(sessions: sessionmaker[Session], run: Callable[[Session], object]) -> list[str]:
    """The SQLite query plan of every SELECT `run` sends."""
    sent: list[tuple[str, Any]] = []
    engine = sessions.kw["bind"]

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            sent.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        with transaction(sessions) as session:
            run(session)
    finally:
        event.remove(engine, "before_cursor_execute", record)
    with engine.connect() as conn:
        driver = conn.connection.driver_connection
        assert driver is not None
        return [" / ".join(row[3] for row in driver.execute("EXPLAIN QUERY PLAN " + s, p)) for s, p in sent]


def test_counting_a_tenants_queued_jobs_walks_its_own_batches_not_the_whole_queue(
    sessions: sessionmaker[Session],
) -> None:
    _add_batch(sessions, "hostile", 200, age_s=40)
    mine = _add_batch(sessions, "calm", 3, age_s=10)
    with transaction(sessions) as session:
        assert queued_jobs(session, "calm") == 3

    for plan in _plans(sessions, lambda session: queued_jobs(session, "calm")):
        assert STATUS_INDEX not in plan, plan
    with transaction(sessions) as session:
        job, batch = session.execute(select(Job, Batch).join(Batch).where(Job.id == f"{mine}-2")).one()
    before = tuple_(Job.queued_at, Job.line) < tuple_(job.queued_at, job.line)
    ahead = _plans(
        sessions, lambda s: _ahead_in_key(s, model_set="m", key=("bulk", "calm"), batch=batch, before=before)
    )
    assert ahead and all(STATUS_INDEX not in plan for plan in ahead), ahead


def test_a_forecast_from_a_snapshot_is_the_forecast_read_now(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    _add_batch(sessions, "hostile", 40, age_s=40)
    mine = _add_batch(sessions, "calm", 5, age_s=10)
    snapshots = BacklogSnapshots(sessions)
    for line in range(5):
        job_id = f"{mine}-{line}"
        now = utcnow()
        read_now = forecast_job(sessions=sessions, settings=settings, job_id=job_id, dispatched=2, now=now)
        snapshot = forecast_job(
            sessions=sessions, settings=settings, job_id=job_id, dispatched=2, now=now, backlog=snapshots.counts
        )
        assert snapshot == read_now and read_now is not None


def test_a_job_newer_than_the_snapshot_still_gets_a_position_in_its_key(
    sessions: sessionmaker[Session], settings: Settings
) -> None:
    _add_batch(sessions, "hostile", 40, age_s=40)
    snapshots = BacklogSnapshots(sessions, max_age_s=3600)
    snapshots.counts("m")  # read before calm's jobs came
    mine = _add_batch(sessions, "calm", 3, age_s=10)
    forecast = forecast_job(
        sessions=sessions, settings=settings, job_id=f"{mine}-2", dispatched=0, now=utcnow(), backlog=snapshots.counts
    )
    assert forecast is not None and forecast.position == 4  # alternating with hostile: its 3rd job starts 5th


class FakeRead:
    """A backlog read whose answers the test gives, one per read, and which waits while `hold` is clear."""

    def __init__(self) -> None:
        self.answers: list[dict[Key, int]] = []
        self.reads = 0
        self.hold = threading.Event()
        self.hold.set()
        self.done = threading.Event()

    def __call__(self, _model_set: str) -> dict[Key, int]:
        self.hold.wait(30)
        self.reads += 1
        answer = self.answers.pop(0)
        self.done.set()
        return answer


def test_a_snapshot_is_read_once_per_max_age_and_never_waited_for_once_there() -> None:
    clock = [0.0]
    read = FakeRead()
    read.answers = [{("bulk", "a"): 1}, {("bulk", "a"): 2}]
    snapshots = BacklogSnapshots(sessionmaker(), max_age_s=1.0, max_stale_s=10.0, clock=lambda: clock[0], read=read)

    assert snapshots.counts("m") == {("bulk", "a"): 1}  # the first is read by the forecast itself
    clock[0] = 0.5
    assert snapshots.counts("m") == {("bulk", "a"): 1} and read.reads == 1  # young enough: not read again

    clock[0] = 2.0
    read.hold.clear()
    read.done.clear()
    assert snapshots.counts("m") == {("bulk", "a"): 1}  # stale: served while a thread reads the next
    assert snapshots.counts("m") == {("bulk", "a"): 1} and read.reads == 1  # one read at a time
    read.hold.set()
    assert read.done.wait(30)
    clock[0] = 2.5
    _wait_for(lambda: snapshots.counts("m") == {("bulk", "a"): 2})
    assert read.reads == 2


def test_a_snapshot_too_old_is_read_again_before_it_is_used() -> None:
    clock = [0.0]
    read = FakeRead()
    read.answers = [{("bulk", "a"): 1}, {("bulk", "a"): 7}]
    snapshots = BacklogSnapshots(sessionmaker(), max_age_s=1.0, max_stale_s=10.0, clock=lambda: clock[0], read=read)
    snapshots.counts("m")
    clock[0] = 3600.0  # an hour without a forecast
    assert snapshots.counts("m") == {("bulk", "a"): 7}


def test_a_failed_background_read_keeps_the_snapshot_and_is_tried_again() -> None:
    clock = [0.0]
    answers: list[Any] = [{("bulk", "a"): 1}, RuntimeError("database gone"), {("bulk", "a"): 3}]
    done = threading.Semaphore(0)

    def read(_model_set: str) -> dict[Key, int]:
        answer = answers.pop(0)
        if len(answers) < 2:
            done.release()
        if isinstance(answer, Exception):
            raise answer
        return dict(answer)

    snapshots = BacklogSnapshots(sessionmaker(), max_age_s=1.0, clock=lambda: clock[0], read=read)
    snapshots.counts("m")
    clock[0] = 2.0
    assert snapshots.counts("m") == {("bulk", "a"): 1}
    assert done.acquire(timeout=30)
    _wait_for(lambda: snapshots.counts("m") == {("bulk", "a"): 3})


def _wait_for(condition: Callable[[], bool]) -> None:
    """Until `condition()` holds (a background read ends soon after its answer is given)."""
    ready = threading.Event()
    for _ in range(3000):
        if condition():
            return
        ready.wait(0.01)
    raise AssertionError("the snapshot was not read again")


def test_the_backlog_counts_every_tenant_the_snapshot_holds(sessions: sessionmaker[Session]) -> None:
    _add_batch(sessions, "hostile", 40, age_s=40)
    _add_batch(sessions, "calm", 2, age_s=10)
    snapshots = BacklogSnapshots(sessions)
    assert snapshots.counts("m") == backlog_counts(sessions=sessions, model_set="m")
    assert snapshots.counts("m") == {("bulk", "hostile"): 40, ("bulk", "calm"): 2}
