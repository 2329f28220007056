"""A batch canceled in chunks (`cancel_batch`) ends as one canceled in one transaction: every live
job canceled, each with its `job.canceled` message once and its usage rolled up once; and no
transaction of it holds more than a chunk of jobs (SQLite's write lock is free in between)."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from sqlalchemy import Engine, event, func, insert, select
from sqlalchemy.orm import Session, sessionmaker

import scheduler.batches.actions as actions
from scheduler.batches.actions import cancel, cancel_batch
from scheduler.webhooks.subscriptions import subscribe
from shared.db import (
    Job,
    JobStatus,
    Tenant,
    UsageRollup,
    WebhookMessage,
)
from shared.jobs import transaction
from tests.scheduler.batches.conftest import insert_mixed_batch

JOBS = 60
FINISHED = 5  # the first jobs already succeeded: a cancel leaves them as they are
RUNNING = 4  # the next ones run on a worker: a cancel cancels them too
HOOK = "https://hooks.example.com/ipab"


def _batch(sessions: sessionmaker[Session], batch_id: str = "big") -> str:
    """A batch of JOBS jobs (FINISHED succeeded, RUNNING running, the rest queued), every job subscribed
    to `job.canceled` and the batch to `batch.completed`."""
    with transaction(sessions) as session:
        if session.get(Tenant, "t") is None:
            session.execute(insert(Tenant).values(name="t", webhook_secret="s"))
        spec = json.dumps({"params": {}, "references": []})
        rows = insert_mixed_batch(
            session, batch_id, name=f"t/{batch_id}", jobs=JOBS, finished=FINISHED, running=RUNNING, spec=spec
        )
        for row in rows:
            subscribe(session=session, subject_id=row["id"], kind="job", tenant="t", url=HOOK, events=["job.canceled"])
        subscribe(session=session, subject_id=batch_id, kind="batch", tenant="t", url=HOOK, events=["batch.completed"])
    return batch_id


def _outcome(sessions: sessionmaker[Session], batch_id: str) -> dict[str, Any]:
    """What a cancel leaves: statuses, messages per job, and the usage rolled up."""
    with transaction(sessions) as session:
        statuses = dict(
            session.execute(select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)).all()
        )
        messages = dict(
            session.execute(
                select(WebhookMessage.subject_id, func.count())
                .where(WebhookMessage.event_type == "job.canceled")
                .group_by(WebhookMessage.subject_id)
            ).all()
        )
        rolled_up = session.scalar(select(func.sum(UsageRollup.jobs)).where(UsageRollup.batch_id == batch_id))
    return {"statuses": statuses, "messages": messages, "rolled_up": rolled_up}


def _commits(engine: Engine) -> list[int]:
    """A list that gets one entry per transaction committed on `engine` from now on."""
    commits: list[int] = []
    event.listen(engine, "commit", lambda _conn: commits.append(1))
    return commits


def test_a_batch_canceled_in_chunks_ends_as_one_canceled_at_once(sessions: sessionmaker[Session]) -> None:
    _batch(sessions, "in-chunks")
    _batch(sessions, "at-once")
    engine = sessions.kw["bind"]
    commits = _commits(engine)

    assert cancel_batch(sessions=sessions, batch_id="in-chunks", chunk=7, pause_s=0) == JOBS - FINISHED
    chunked_commits = len(commits)
    with transaction(sessions) as session:
        assert len(cancel(session=session, batch_id="at-once")) == JOBS - FINISHED

    chunked, at_once = _outcome(sessions, "in-chunks"), _outcome(sessions, "at-once")
    live = JOBS - FINISHED
    assert chunked["statuses"] == {JobStatus.canceled.value: live, JobStatus.succeeded.value: FINISHED}
    assert chunked["statuses"] == at_once["statuses"]
    assert chunked["rolled_up"] == at_once["rolled_up"] == live  # each canceled job counted once
    canceled_ids = {f"in-chunks-{i:03d}" for i in range(FINISHED, JOBS)}
    assert {k: v for k, v in chunked["messages"].items() if k.startswith("in-chunks")} == dict.fromkeys(canceled_ids, 1)
    assert live == 55 and chunked_commits == 8  # a transaction per chunk: 7 of 7 jobs, then the last 6


def test_no_transaction_of_a_chunked_cancel_cancels_more_than_a_chunk(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    _batch(sessions)
    per_transaction: list[int] = []
    real: Callable[..., list[str]] = actions.cancel

    def counted(**kwargs: Any) -> list[str]:
        canceled = real(**kwargs)
        per_transaction.append(len(canceled))
        return canceled

    monkeypatch.setattr(actions, "cancel", counted)
    cancel_batch(sessions=sessions, batch_id="big", chunk=10, pause_s=0)
    assert max(per_transaction) == 10 and sum(per_transaction) == JOBS - FINISHED


def test_a_chunked_cancel_that_fails_part_way_finishes_when_asked_again(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    _batch(sessions)
    real: Callable[..., list[str]] = actions.cancel
    calls: list[int] = []

    def fails_third(**kwargs: Any) -> list[str]:
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("the database went away")
        return real(**kwargs)

    monkeypatch.setattr(actions, "cancel", fails_third)
    with pytest.raises(RuntimeError):
        cancel_batch(sessions=sessions, batch_id="big", chunk=10, pause_s=0)
    part = _outcome(sessions, "big")
    assert part["statuses"][JobStatus.canceled.value] == 20  # two chunks committed; the third rolled back
    assert sum(part["messages"].values()) == 20 and part["rolled_up"] == 20

    monkeypatch.setattr(actions, "cancel", real)
    assert cancel_batch(sessions=sessions, batch_id="big", chunk=10, pause_s=0) == JOBS - FINISHED - 20
    done = _outcome(sessions, "big")
    assert done["statuses"] == {JobStatus.canceled.value: JOBS - FINISHED, JobStatus.succeeded.value: FINISHED}
    assert set(done["messages"].values()) == {1} and len(done["messages"]) == JOBS - FINISHED
    assert done["rolled_up"] == JOBS - FINISHED


def test_a_chunked_cancel_of_a_batch_with_nothing_live_writes_nothing(sessions: sessionmaker[Session]) -> None:
    _batch(sessions)
    cancel_batch(sessions=sessions, batch_id="big", pause_s=0)
    before = _outcome(sessions, "big")
    assert cancel_batch(sessions=sessions, batch_id="big", pause_s=0) == 0
    assert _outcome(sessions, "big") == before
