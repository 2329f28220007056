"""Webhook delivery, a loop inside `ipab api`: outbox scan, then delivery of what is due.

Each message keeps its id for every attempt (the `webhook-id` header, for the receiver's
dedupe), is signed with the tenant's secret, and is retried with exponential backoff until
IPAB_WEBHOOK_GIVE_UP_S.

Each message is claimed before it is sent (a conditional UPDATE moving its next attempt
past the delivery timeout), so two API processes never send one message at once, and a
process killed mid-delivery leaves a claim that expires: the message is sent again, with
the same id. Delivery connects to the address that was checked (no DNS rebinding between
the check and the connection) and follows no redirects.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any, Final
from urllib.parse import urlsplit

from sqlalchemy import and_, select, update
from sqlalchemy.orm import Session, sessionmaker

from scheduler.batches.events import outbox_batch_events, outbox_job_events
from scheduler.tenants import tenant_secret
from scheduler.webhooks.addresses import public_address
from scheduler.webhooks.signing import sign
from shared.db import WebhookMessage, utcnow
from shared.errors import InvalidInput, IpabError
from shared.jobs import transaction
from shared.settings import Settings

log = logging.getLogger(__name__)
DELIVERY_THREADS: Final = 8
DUE_LIMIT: Final = 64
USER_AGENT: Final = "ipab-webhooks/1"
MAX_ERROR_CHARS: Final = 500


class _PinnedHTTPSConnection(http.client.HTTPSConnection):
    """HTTPS to a fixed IP, with SNI and certificate checks for the URL's host."""

    def __init__(self, host: str, ip: str, port: int, timeout: float) -> None:
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self._ip = ip

    def connect(self) -> None:
        sock = socket.create_connection((self._ip, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def post_signed(*, url: str, body: bytes, headers: dict[str, str], timeout_s: float, allow_private: bool) -> int:
    """POST `body` to `url` at the address checked now; returns the HTTP status."""
    host, port, ip = public_address(url, allow_private=allow_private)
    parts = urlsplit(url)
    conn: http.client.HTTPConnection
    if parts.scheme == "https":
        conn = _PinnedHTTPSConnection(host, ip, port, timeout_s)
    else:
        conn = http.client.HTTPConnection(ip, port, timeout=timeout_s)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    host_header = parts.netloc.rsplit("@", 1)[-1]
    try:
        conn.request("POST", path, body=body, headers={**headers, "Host": host_header})
        response = conn.getresponse()
        response.read(65536)
        return response.status
    finally:
        conn.close()


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


def _claim_due(sessions: sessionmaker[Session], *, lease_s: float) -> list[WebhookMessage]:
    now = utcnow()
    claimed = []
    with transaction(sessions) as session:
        due = session.scalars(
            select(WebhookMessage).where(due_filter(now)).order_by(WebhookMessage.next_attempt_at).limit(DUE_LIMIT)
        ).all()
        for msg in due:
            result = session.execute(
                update(WebhookMessage)
                .where(WebhookMessage.id == msg.id, WebhookMessage.next_attempt_at == msg.next_attempt_at)
                .values(next_attempt_at=now + timedelta(seconds=lease_s))
            )
            if getattr(result, "rowcount", 0) == 1:
                claimed.append(msg)
    return claimed


class WebhookDelivery:
    """Scans for events and delivers due webhook messages until stopped."""

    def __init__(self, *, settings: Settings, sessions: sessionmaker[Session]) -> None:
        self.settings = settings
        self.sessions = sessions
        self._pool = ThreadPoolExecutor(max_workers=DELIVERY_THREADS, thread_name_prefix="webhook")
        self._secrets: dict[str, str] = {}

    def run(self, stop: threading.Event, *, every_pass: Callable[[], object] | None = None) -> None:
        """Loop: scan, deliver, sleep IPAB_WEBHOOK_POLL_S; errors are logged and the loop goes on."""
        while not stop.is_set():
            try:
                self.run_once()
                if every_pass is not None:
                    every_pass()
            except IpabError as e:
                log.warning("webhook delivery: %s", e)
            except Exception:
                log.exception("webhook delivery: unexpected error; going on")
            stop.wait(self.settings.webhook_poll_s)
        self._pool.shutdown(wait=True)

    def run_once(self) -> int:
        """One pass: write the outbox rows of new events, then deliver what is due; returns messages tried."""
        with transaction(self.sessions) as session:
            outbox_job_events(session=session)
            outbox_batch_events(session=session)
        lease_s = 2 * self.settings.webhook_timeout_s + 5
        due = _claim_due(self.sessions, lease_s=lease_s)
        list(self._pool.map(self._deliver, due))
        return len(due)

    def _secret(self, tenant: str) -> str:
        if tenant not in self._secrets:
            with transaction(self.sessions) as session:
                self._secrets[tenant] = tenant_secret(session=session, tenant=tenant) or ""
        return self._secrets[tenant]

    def _deliver(self, msg: WebhookMessage) -> None:
        body = msg.payload.encode()
        stamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": msg.id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": sign(secret=self._secret(msg.tenant), msg_id=msg.id, timestamp_s=stamp, body=body),
        }
        error = None
        try:
            status = post_signed(
                url=msg.url,
                body=body,
                headers=headers,
                timeout_s=self.settings.webhook_timeout_s,
                allow_private=self.settings.webhook_allow_private,
            )
            if not 200 <= status < 300:
                error = f"HTTP {status}"
        except (OSError, http.client.HTTPException, InvalidInput) as e:
            error = f"{type(e).__name__}: {e}"
        self._record(msg, error)

    def _record(self, msg: WebhookMessage, error: str | None) -> None:
        now = utcnow()
        values: dict[str, object] = {"attempts": msg.attempts + 1}
        if error is None:
            values["delivered_at"] = now
        else:
            values["last_error"] = error[:MAX_ERROR_CHARS]
            values.update(self._retry_values(msg, now))
            log.info("webhook %s to %s failed (attempt %d): %s", msg.id, msg.url, msg.attempts + 1, error)
        with transaction(self.sessions) as session:
            session.execute(update(WebhookMessage).where(WebhookMessage.id == msg.id).values(**values))

    def _retry_values(self, msg: WebhookMessage, now: datetime) -> dict[str, object]:
        s = self.settings
        if now - msg.created_at > timedelta(seconds=s.webhook_give_up_s):
            return {"failed_at": now}
        when = next_attempt_at(
            attempts=msg.attempts + 1, now=now, base_s=s.webhook_retry_base_s, max_s=s.webhook_retry_max_s
        )
        return {"next_attempt_at": when}
