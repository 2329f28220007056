"""Subscriptions: which events of a job or batch go to which URL, recorded with the job or batch."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from sqlalchemy.orm import Session

from shared.db import WebhookSubscription, insert_ignoring_duplicates
from shared.errors import InvalidInput


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
    dialect = session.get_bind().dialect.name
    stmt = insert_ignoring_duplicates(WebhookSubscription, dialect=dialect, unique=["subject_id"])
    row = {"subject_id": subject_id, "kind": kind, "tenant": tenant, "url": url, "events": json.dumps(list(events))}
    session.execute(stmt.values(**row))
