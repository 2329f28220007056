"""The outbox of job and batch events: a row per message before anything is sent, so a crash loses none.

Events: `job.succeeded`, `job.failed`, `job.canceled`, `batch.completed`.
- where the control plane changes a status itself (cancel), the rows are written in the
  same transaction as the change (`outbox_job_events` on the same session);
- where a worker does (succeeded, failed), the webhook delivery loop's scan finds finished
  jobs whose subscription has not been notified yet, and writes the rows then; so it does for
  a job canceled while it ran, once its worker reported the steps it ran or its lease lapsed
  (`shared.jobs.AWAITING_REPORT`): its event carries what was billed, not the nothing of before;
  and `batch.completed` waits for those reports too.
A subscription is notified once; a unique (subject, event) keeps a message from being
written twice by two scans at once. Delivery is `scheduler.webhooks.delivery`'s.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final

from sqlalchemy import func, or_, select, update
from sqlalchemy.orm import Session

from scheduler.batches.counts import Tally, count_jobs
from scheduler.batches.record import JobRecord, iso_utc, job_record
from shared.db import TERMINAL, Batch, Job, WebhookMessage, WebhookSubscription, insert_ignoring_duplicates, utcnow
from shared.jobs import AWAITING_REPORT

JOB_EVENTS: Final = {"succeeded": "job.succeeded", "failed": "job.failed", "canceled": "job.canceled"}
BATCH_COMPLETED: Final = "batch.completed"
SCAN_LIMIT: Final = 500
_TERMINAL_VALUES: Final = [s.value for s in TERMINAL]


WEBHOOK_FIELDS: Final = ("client_id", "batch_id", "status", "output_sha256", "error", "metrics", "expires_at")


def webhook_data(record: JobRecord) -> dict[str, Any]:
    """What a job event says about its job: its id and the record's WEBHOOK_FIELDS."""
    return {"id": record.job_id, **{name: getattr(record, name) for name in WEBHOOK_FIELDS}}


def batch_data(batch_id: str, tally: Tally) -> dict[str, Any]:
    """What a `batch.completed` event says about its batch: its counts, and when its objects expire."""
    return {"id": batch_id, "counts": tally.present(), "expires_at": iso_utc(tally.expires_at)}


def _message(sub: WebhookSubscription, event: str, data: dict[str, Any], now: datetime) -> dict[str, Any]:
    payload = {"type": event, "timestamp": iso_utc(now), "data": data}
    return {
        "id": "msg_" + uuid.uuid4().hex,
        "tenant": sub.tenant,
        "url": sub.url,
        "event_type": event,
        "subject_id": sub.subject_id,
        "payload": json.dumps(payload, separators=(",", ":")),
        "attempts": 0,
        "created_at": now,
        "next_attempt_at": now,
    }


def _add_messages(session: Session, messages: list[dict[str, Any]], notified: list[str], now: datetime) -> None:
    if messages:
        dialect = session.get_bind().dialect.name
        stmt = insert_ignoring_duplicates(WebhookMessage, dialect=dialect, unique=["subject_id", "event_type"])
        session.execute(stmt, messages)
    if notified:
        session.execute(
            update(WebhookSubscription).where(WebhookSubscription.subject_id.in_(notified)).values(notified_at=now)
        )


def outbox_job_events(*, session: Session, job_ids: Sequence[str] | None = None) -> int:
    """Write the outbox rows of finished jobs whose subscription was not notified; returns how many.

    Not yet of a canceled job whose worker's report is awaited (AWAITING_REPORT): a later scan's."""
    stmt = (
        select(WebhookSubscription, Job, Batch.model_set)
        .join(Job, Job.id == WebhookSubscription.subject_id)
        .join(Batch, Batch.id == Job.batch_id)
        .where(WebhookSubscription.notified_at.is_(None), Job.status.in_(_TERMINAL_VALUES), ~AWAITING_REPORT)
        .limit(SCAN_LIMIT)
        # A cancel in this very session changed rows its identity map may hold stale.
        .execution_options(populate_existing=True)
    )
    if job_ids is not None:
        stmt = stmt.where(Job.id.in_(list(job_ids)))
    now = utcnow()
    messages, notified = [], []
    for sub, job, model_set in session.execute(stmt).tuples():
        event = JOB_EVENTS[job.status]
        if event in json.loads(sub.events):
            messages.append(_message(sub, event, webhook_data(job_record(job, model_set=model_set)), now))
        notified.append(sub.subject_id)
    _add_messages(session, messages, notified, now)
    return len(messages)


def outbox_batch_events(*, session: Session) -> int:
    """Write `batch.completed` for subscribed batches whose every job is final (and billed: no report
    awaited, so it comes after every job's event); returns how many."""
    unfinished = or_(Job.status.not_in(_TERMINAL_VALUES), AWAITING_REPORT)
    live = select(func.count()).where(Job.batch_id == WebhookSubscription.subject_id, unfinished).scalar_subquery()
    stmt = (
        select(WebhookSubscription, Batch)
        .join(Batch, Batch.id == WebhookSubscription.subject_id)
        .where(WebhookSubscription.notified_at.is_(None), WebhookSubscription.kind == "batch", live == 0)
        .limit(SCAN_LIMIT)
    )
    now = utcnow()
    found = session.execute(stmt).tuples().all()
    tallies = count_jobs(session=session, batch_ids=[batch.id for _, batch in found])
    messages = [_message(sub, BATCH_COMPLETED, batch_data(batch.id, tallies[batch.id]), now) for sub, batch in found]
    _add_messages(session, messages, [sub.subject_id for sub, _ in found], now)
    return len(messages)
