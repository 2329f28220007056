"""Webhooks: subscriptions, the outbox, Standard Webhooks signing, and the dispatcher that delivers.

Events: `job.succeeded`, `job.failed`, `job.canceled`, `batch.completed`. A message is a
row of the outbox (`webhook_outbox`) before anything is sent, so a crash loses none:
- where the control plane changes a status itself (cancel), the row is written in the
  same transaction as the change (`outbox_job_events` on the same session);
- where a worker does (succeeded, failed), the dispatcher's scan finds finished jobs
  whose subscription has not been notified yet, and writes the rows then.
Each message keeps its id for every attempt (the `webhook-id` header, for the receiver's
dedupe), is signed with the tenant's secret over `id.timestamp.body`, and is retried with
exponential backoff until IPAB_WEBHOOK_GIVE_UP_S. Delivery never goes to loopback,
private or link-local addresses unless IPAB_WEBHOOK_ALLOW_PRIVATE=true, and never follows
redirects (a redirect could point anywhere).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import ipaddress
import json
import socket
import time
import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any, Final
from urllib.parse import urlsplit

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session

from shared.db import (
    TERMINAL,
    Batch,
    Job,
    JobStatus,
    WebhookMessage,
    WebhookSubscription,
    insert_ignoring_duplicates,
    utcnow,
)
from shared.errors import InvalidInput

JOB_EVENTS: Final = {"succeeded": "job.succeeded", "failed": "job.failed", "canceled": "job.canceled"}
BATCH_COMPLETED: Final = "batch.completed"
EVENTS: Final = (*JOB_EVENTS.values(), BATCH_COMPLETED)
SCAN_LIMIT: Final = 500
MAX_URL_CHARS: Final = 2000
_TERMINAL_VALUES: Final = [s.value for s in TERMINAL]


# 1. What may be subscribed.


def _addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise InvalidInput("webhook.url", host, f"does not resolve ({e})") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def public_address(url: str, *, allow_private: bool) -> tuple[str, int, str]:
    """(host, port, first allowed IP) of a webhook URL; `InvalidInput` for a private or loopback one."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = _addresses(host, port)
    if not allow_private:
        bad = [a for a in addresses if not a.is_global or a.is_multicast]
        if bad:
            reason = f"resolves to {bad[0]}, a private, loopback or reserved address; webhooks go to public hosts"
            raise InvalidInput("webhook.url", url, reason)
    return host, port, str(addresses[0])


def check_webhook_url(url: Any, *, allow_private: bool) -> str:
    """A webhook URL fit to store: http(s), a host, no credentials, and a public address."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        raise InvalidInput("webhook.url", url, f"must be an http(s) URL of at most {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError as e:
        raise InvalidInput("webhook.url", url, f"is not a URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput("webhook.url", url, "must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise InvalidInput("webhook.url", url, "must not carry credentials; verify the signature instead")
    public_address(url, allow_private=allow_private)
    return url


def check_events(events: Any, *, allowed: Sequence[str]) -> list[str]:
    """The event filter: a list of known event names (None: all of `allowed`)."""
    if events is None:
        return list(allowed)
    if not isinstance(events, list) or not events or not all(isinstance(e, str) for e in events):
        raise InvalidInput("webhook.events", events, f"must be a non-empty list of: {', '.join(allowed)}")
    unknown = [e for e in events if e not in allowed]
    if unknown:
        raise InvalidInput("webhook.events", unknown[0], f"is not an event here; choose from {', '.join(allowed)}")
    return sorted(set(events))


def subscribe(*, session: Session, subject_id: str, kind: str, tenant: str, url: str, events: Sequence[str]) -> None:
    """Record where to tell about a job or batch (in the transaction that creates it)."""
    session.add(
        WebhookSubscription(subject_id=subject_id, kind=kind, tenant=tenant, url=url, events=json.dumps(list(events)))
    )


# 2. Into the outbox.


def _message(sub: WebhookSubscription, event: str, data: dict[str, Any], now: datetime) -> dict[str, Any]:
    payload = {"type": event, "timestamp": now.isoformat() + "Z", "data": data}
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


def job_event_data(job: Job) -> dict[str, Any]:
    """What a job event says about its job."""
    error = None if job.error_type is None else {"type": job.error_type, "message": job.error_message}
    return {
        "id": job.id,
        "client_id": job.client_id,
        "batch_id": job.batch_id,
        "status": job.status,
        "output_sha256": job.output_sha256,
        "error": error,
    }


def outbox_job_events(*, session: Session, job_ids: Sequence[str] | None = None) -> int:
    """Write the outbox rows of finished jobs whose subscription was not notified; returns how many."""
    stmt = (
        select(WebhookSubscription, Job)
        .join(Job, Job.id == WebhookSubscription.subject_id)
        .where(WebhookSubscription.notified_at.is_(None), Job.status.in_(_TERMINAL_VALUES))
        .limit(SCAN_LIMIT)
        # A cancel in this very session changed rows its identity map may hold stale.
        .execution_options(populate_existing=True)
    )
    if job_ids is not None:
        stmt = stmt.where(Job.id.in_(list(job_ids)))
    now = utcnow()
    messages, notified = [], []
    for sub, job in session.execute(stmt).tuples():
        event = JOB_EVENTS[job.status]
        if event in json.loads(sub.events):
            messages.append(_message(sub, event, job_event_data(job), now))
        notified.append(sub.subject_id)
    _add_messages(session, messages, notified, now)
    return len(messages)


def outbox_batch_events(*, session: Session) -> int:
    """Write `batch.completed` for subscribed batches whose every job is final; returns how many."""
    live = (
        select(func.count())
        .where(Job.batch_id == WebhookSubscription.subject_id, Job.status.not_in(_TERMINAL_VALUES))
        .scalar_subquery()
    )
    stmt = (
        select(WebhookSubscription, Batch)
        .join(Batch, Batch.id == WebhookSubscription.subject_id)
        .where(WebhookSubscription.notified_at.is_(None), WebhookSubscription.kind == "batch", live == 0)
        .limit(SCAN_LIMIT)
    )
    now = utcnow()
    messages, notified = [], []
    for sub, batch in session.execute(stmt).tuples():
        counts = dict(
            session.execute(select(Job.status, func.count()).where(Job.batch_id == batch.id).group_by(Job.status))
            .tuples()
            .all()
        )
        messages.append(_message(sub, BATCH_COMPLETED, {"id": batch.id, "counts": counts}, now))
        notified.append(sub.subject_id)
    _add_messages(session, messages, notified, now)
    return len(messages)


# 3. Signing (Standard Webhooks).


def sign(*, secret: str, msg_id: str, timestamp_s: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 over "id.timestamp.body">` keyed by the secret's base64 part."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{timestamp_s}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(*, secret: str, headers: dict[str, str], body: bytes, tolerance_s: float = 300.0) -> bool:
    """Whether a delivery is genuine and fresh (what a receiver runs; tests use it)."""
    msg_id, stamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
    if not stamp.isdigit() or abs(time.time() - int(stamp)) > tolerance_s:
        return False
    expected = sign(secret=secret, msg_id=msg_id, timestamp_s=int(stamp), body=body)
    offered = headers.get("webhook-signature", "").split()
    return any(hmac.compare_digest(expected, sig) for sig in offered)


# 4. Backoff.


def next_attempt_at(*, attempts: int, now: datetime, base_s: float, max_s: float) -> datetime:
    """When to try again after `attempts` failed tries: base * 2**(attempts-1), capped at max."""
    delay_s = min(max_s, base_s * 2 ** max(0, attempts - 1))
    return now + timedelta(seconds=delay_s)


def due_filter(now: datetime) -> Any:
    """Messages to try now: undelivered, not given up, due."""
    return and_(
        WebhookMessage.delivered_at.is_(None),
        WebhookMessage.failed_at.is_(None),
        WebhookMessage.next_attempt_at <= now,
    )


# 5. Status changes made here, with their events in the same transaction.


def cancel_with_events(*, session: Session, batch_id: str, job_ids: Sequence[str] | None = None) -> list[str]:
    """Cancel the live jobs of a batch (or only `job_ids`) and write their `job.canceled` messages, atomically.

    The same conditional update as `shared.jobs.cancel_jobs`; returns the ids it canceled.
    """
    where = [Job.batch_id == batch_id, Job.status.in_([JobStatus.queued.value, JobStatus.running.value])]
    if job_ids is not None:
        where.append(Job.id.in_(list(job_ids)))
    stmt = (
        update(Job)
        .where(*where)
        .values(status=JobStatus.canceled.value, finished_at=utcnow(), lease_expires_at=None)
        .returning(Job.id)
        .execution_options(synchronize_session=False)
    )
    canceled = list(session.execute(stmt).scalars())
    if canceled:
        outbox_job_events(session=session, job_ids=canceled)
    return canceled
