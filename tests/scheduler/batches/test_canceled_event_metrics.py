"""A job canceled while it ran says in its `job.canceled` event what it was billed: the event waits
for its worker's report of the steps it ran (or for its lease to lapse without one), is written
once, and names the job's model set, as a failed job's does. A queued job's event is written with
its cancel, as before."""

from __future__ import annotations

import json
from typing import Any

import pytest
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from scheduler.batches.actions import cancel
from scheduler.batches.events import outbox_batch_events, outbox_job_events
from scheduler.webhooks.subscriptions import subscribe
from shared.db import Batch, Job, Tenant, WebhookMessage, insert_new_jobs, new_id, utcnow
from shared.jobs import claim_job, expire_leases, fail_job, record_left_attempt, renew_lease, transaction
from shared.usage import AttemptUsage

PIXELS = 64 * 64
HOOK = "https://hooks.example.com/ipab"
EVENTS = ["job.canceled", "job.failed"]
SPEC = json.dumps({"params": {"prompt": "a cat"}, "references": []})


def _batch(sessions: sessionmaker[Session], count: int) -> tuple[str, list[str]]:
    """Tenant acme's batch of `count` queued jobs on model set `tiny`, each job subscribed to EVENTS
    and the batch to `batch.completed`."""
    with transaction(sessions) as session:
        session.add(Tenant(name="acme", webhook_secret="s"))
        batch = Batch(id=new_id(), name="posters", model_set="tiny", job_count=count, tenant="acme")
        session.add(batch)
        session.flush()
        rows = [(new_id(), i, None, f"k{i}", SPEC, i, "bulk") for i in range(count)]
        insert_new_jobs(session, batch_id=batch.id, queued_at=utcnow(), rows=rows)
        for row in rows:
            subscribe(session=session, subject_id=row[0], kind="job", tenant="acme", url=HOOK, events=EVENTS)
        subscribe(session=session, subject_id=batch.id, kind="batch", tenant="acme", url=HOOK, events=[])
    return batch.id, [row[0] for row in rows]


def _claim(sessions: sessionmaker[Session], job_id: str) -> int:
    attempt = claim_job(sessions=sessions, job_id=job_id, worker_host="w", lease_s=30, max_attempts=3)
    assert attempt is not None
    return attempt


def _scan(sessions: sessionmaker[Session]) -> None:
    """One pass of the webhook delivery loop's scan (`WebhookDispatcher.run_once`)."""
    with transaction(sessions) as session:
        outbox_job_events(session=session)
        outbox_batch_events(session=session)


def _events(sessions: sessionmaker[Session], subject_id: str) -> list[dict[str, Any]]:
    """The payloads written for `subject_id`, oldest first."""
    with transaction(sessions) as session:
        stmt = select(WebhookMessage.payload).where(WebhookMessage.subject_id == subject_id)
        return [json.loads(payload) for payload in session.scalars(stmt.order_by(WebhookMessage.created_at))]


def _lapse(sessions: sessionmaker[Session], job_id: str) -> None:
    """The lease of the job's worker runs out (its worker died, or never noticed)."""
    with transaction(sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow().replace(year=2000)))


def test_a_running_jobs_canceled_event_carries_the_steps_its_worker_reported(sessions: sessionmaker[Session]) -> None:
    batch_id, (running, queued) = _batch(sessions, 2)
    attempt = _claim(sessions, running)
    with transaction(sessions) as session:
        assert sorted(cancel(session=session, batch_id=batch_id)) == sorted([running, queued])

    # The queued job's event is written with the cancel; the running one's waits for its worker.
    (queued_event,) = _events(sessions, queued)
    assert queued_event["type"] == "job.canceled" and queued_event["data"]["metrics"]["steps"] is None
    _scan(sessions)
    assert _events(sessions, running) == [] and _events(sessions, batch_id) == []

    usage = AttemptUsage(gpu_s=0.75, steps_run=3, pixels=PIXELS)
    assert record_left_attempt(sessions=sessions, job_id=running, attempt=attempt, usage=usage, reported_s=0.0)
    _scan(sessions)
    # A retried report, and more scans: no second event.
    assert not record_left_attempt(sessions=sessions, job_id=running, attempt=attempt, usage=usage, reported_s=0.0)
    _scan(sessions)

    (event,) = _events(sessions, running)
    assert event["type"] == "job.canceled" and event["data"]["status"] == "canceled"
    metrics = event["data"]["metrics"]
    assert (metrics["steps"], metrics["pixel_steps"], metrics["images"]) == (3, 3 * PIXELS, 0)
    assert metrics["gpu_seconds"] == pytest.approx(0.75) and metrics["model_set"] == "tiny"
    (batch_event,) = _events(sessions, batch_id)  # after every job's event
    assert batch_event["type"] == "batch.completed"


def test_a_job_whose_worker_never_reports_gets_one_canceled_event_after_its_lease(
    sessions: sessionmaker[Session],
) -> None:
    batch_id, (job_id,) = _batch(sessions, 1)
    attempt = _claim(sessions, job_id)
    assert renew_lease(sessions=sessions, job_id=job_id, attempt=attempt, lease_s=30, max_lease_s=300, gpu_s=0.4)
    with transaction(sessions) as session:
        assert cancel(session=session, batch_id=batch_id) == [job_id]
    expire_leases(sessions=sessions, max_attempts=3)  # its lease still runs: its report may come
    _scan(sessions)
    assert _events(sessions, job_id) == []

    _lapse(sessions, job_id)
    expire_leases(sessions=sessions, max_attempts=3)
    _scan(sessions)
    # Its worker wakes up after all: too late to be billed (its seconds are lost), and no second event.
    usage = AttemptUsage(gpu_s=0.75, steps_run=3, pixels=PIXELS)
    assert not record_left_attempt(sessions=sessions, job_id=job_id, attempt=attempt, usage=usage, reported_s=0.4)
    expire_leases(sessions=sessions, max_attempts=3)
    _scan(sessions)

    (event,) = _events(sessions, job_id)
    metrics = event["data"]["metrics"]
    assert event["type"] == "job.canceled" and (metrics["gpu_seconds"], metrics["steps"]) == (None, None)
    with transaction(sessions) as session:
        job = session.scalars(select(Job).where(Job.id == job_id)).one()
        assert (job.gpu_s, job.steps_run, job.lease_expires_at) == (None, None, None)
        assert job.lost_gpu_s == pytest.approx(0.75)  # 0.4 reported at its heartbeat, 0.35 in its late report
    assert [e["type"] for e in _events(sessions, batch_id)] == ["batch.completed"]


def test_a_failed_job_names_its_model_set(sessions: sessionmaker[Session]) -> None:
    _, (job_id,) = _batch(sessions, 1)
    attempt = _claim(sessions, job_id)
    assert fail_job(sessions=sessions, job_id=job_id, attempt=attempt, error_type="X", message="bad", gpu_s=0.2)
    _scan(sessions)
    (event,) = _events(sessions, job_id)
    assert event["type"] == "job.failed"
    assert (event["data"]["metrics"]["model_set"], event["data"]["metrics"]["device"]) == ("tiny", None)
