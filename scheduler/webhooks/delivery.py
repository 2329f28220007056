"""Webhook delivery, a loop inside `ipab api`: outbox scan, then delivery of what is due.

Each message keeps its id for every attempt (the `webhook-id` header, for the receiver's
dedupe), is signed with the tenant's secret, and is retried with exponential backoff until
IPAB_WEBHOOK_GIVE_UP_S. A message whose tenant has no secret yet is not sent (a signature
with an empty key proves nothing): it waits, its `last_error` saying why, and goes once the
secret exists. Secrets are read again at least every SECRET_CACHE_S.

Delivery is fair between tenants: one tenant's endpoint that never answers must not hold
up another tenant's webhooks. So a tenant has at most PER_TENANT deliveries in flight, a
pass never waits for a delivery (it starts what is due in the pool and goes on), it claims
only what it can start now, and it takes due messages round robin by tenant: every
tenant's oldest first, then their second, the tenant served longest ago first.

Each message is claimed before it is sent (a conditional UPDATE moving its next attempt
past the delivery's longest time), so two API processes never send one message at once,
and a process killed mid-delivery leaves a claim that expires: the message is sent again,
with the same id. Delivery connects to the address that was checked (no DNS rebinding
between the check and the connection) and follows no redirects.
"""

from __future__ import annotations

import http.client
import logging
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any, Final
from urllib.parse import urlsplit

from sqlalchemy import and_, func, select, update
from sqlalchemy.orm import Session, aliased, sessionmaker

from scheduler.batches.events import outbox_batch_events, outbox_job_events
from scheduler.tenants import tenant_secret
from scheduler.webhooks.resolver import Resolver
from scheduler.webhooks.signing import sign
from shared.db import WebhookMessage, utcnow
from shared.errors import InvalidInput, IpabError
from shared.jobs import transaction
from shared.settings import Settings

log = logging.getLogger(__name__)
DELIVERY_THREADS: Final = 16
PER_TENANT: Final = 2  # deliveries in flight per tenant and process
CANDIDATES: Final = 1000  # due rows read per pass, PER_TENANT per tenant at most
SECRET_CACHE_S: Final = 30.0  # a present secret is re-read after this long; a missing one every time
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


def post_signed(
    *, url: str, address: tuple[str, int, str], body: bytes, headers: dict[str, str], timeout_s: float
) -> int:
    """POST `body` to `url` at `address` (host, port, the IP checked now); returns the HTTP status."""
    host, port, ip = address
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


def due_round_robin(session: Session, *, now: datetime) -> list[tuple[WebhookMessage, int]]:
    """Due messages with their rank in their tenant (1: its oldest), at most PER_TENANT per tenant.

    Ordered by rank: every tenant's oldest due message comes before any tenant's second, so
    a tenant with thousands due cannot push another's one message out of the pass.
    """
    rank = func.row_number().over(
        partition_by=WebhookMessage.tenant, order_by=(WebhookMessage.next_attempt_at, WebhookMessage.id)
    )
    ranked = select(WebhookMessage, rank.label("rank")).where(due_filter(now)).subquery()
    message = aliased(WebhookMessage, ranked)
    rows = session.execute(
        select(message, ranked.c.rank)
        .where(ranked.c.rank <= PER_TENANT)
        .order_by(ranked.c.rank, ranked.c.next_attempt_at)
        .limit(CANDIDATES)
    ).all()
    return [(row[0], int(row[1])) for row in rows]


def claim(session: Session, msg: WebhookMessage, *, until: datetime) -> bool:
    """Move a due message's next attempt to `until`, unless another process claimed it first."""
    result = session.execute(
        update(WebhookMessage)
        .where(WebhookMessage.id == msg.id, WebhookMessage.next_attempt_at == msg.next_attempt_at)
        .values(next_attempt_at=until)
    )
    return getattr(result, "rowcount", 0) == 1


class _Slots:
    """Deliveries in flight, per tenant and in all, and when each tenant last started one."""

    def __init__(self, *, threads: int, per_tenant: int) -> None:
        self.threads, self.per_tenant = threads, per_tenant
        self._lock = threading.Lock()
        self._in_flight: Counter[str] = Counter()
        self._last_start: dict[str, float] = {}

    def free(self) -> int:
        with self._lock:
            return self.threads - sum(self._in_flight.values())

    def take(self, tenant: str) -> bool:
        """Count one more delivery of `tenant`, if it and the pool have room."""
        with self._lock:
            if self._in_flight[tenant] >= self.per_tenant or sum(self._in_flight.values()) >= self.threads:
                return False
            self._in_flight[tenant] += 1
            self._last_start[tenant] = time.monotonic()
            return True

    def give_back(self, tenant: str) -> None:
        with self._lock:
            self._in_flight[tenant] -= 1
            if self._in_flight[tenant] <= 0:
                del self._in_flight[tenant]

    def last_start(self, tenant: str) -> float:
        with self._lock:
            return self._last_start.get(tenant, 0.0)


class WebhookDelivery:
    """Scans for events and delivers due webhook messages until stopped, fairly between tenants."""

    def __init__(
        self, *, settings: Settings, sessions: sessionmaker[Session], resolver: Resolver | None = None
    ) -> None:
        self.settings = settings
        self.sessions = sessions
        self._pool = ThreadPoolExecutor(max_workers=DELIVERY_THREADS, thread_name_prefix="webhook")
        self._slots = _Slots(threads=DELIVERY_THREADS, per_tenant=PER_TENANT)
        self._resolver = resolver or Resolver()
        self._secrets: dict[str, tuple[str, float]] = {}  # tenant -> (secret, when read)

    def run(self, stop: threading.Event, *, every_pass: Callable[[], object] | None = None) -> None:
        """Loop: scan, start deliveries, sleep IPAB_WEBHOOK_POLL_S; errors are logged and the loop goes on."""
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
        self._resolver.close()

    def run_once(self) -> int:
        """One pass: write the outbox rows of new events, then start what is due and fits; returns messages started.

        It does not wait for them: a delivery ends in its thread, and frees its slot there.
        """
        with transaction(self.sessions) as session:
            outbox_job_events(session=session)
            outbox_batch_events(session=session)
        if self._slots.free() <= 0:
            return 0
        claimed = self._claim()
        for msg in claimed:
            self._pool.submit(self._deliver_in_slot, msg)
        return len(claimed)

    def lease_s(self) -> float:
        """How long a claim holds: past the longest delivery (look-up, connect, read), with room to record it."""
        s = self.settings
        return s.webhook_dns_timeout_s + 2 * s.webhook_timeout_s + 5

    def _claim(self) -> list[WebhookMessage]:
        """Claim due messages that have a slot now, round robin by tenant; each claimed one holds its slot."""
        now = utcnow()
        until = now + timedelta(seconds=self.lease_s())
        claimed = []
        with transaction(self.sessions) as session:
            candidates = due_round_robin(session, now=now)
            candidates.sort(key=lambda c: (c[1], self._slots.last_start(c[0].tenant), c[0].next_attempt_at))
            for msg, _rank in candidates:
                if not self._slots.take(msg.tenant):
                    continue
                if claim(session, msg, until=until):
                    claimed.append(msg)
                else:
                    self._slots.give_back(msg.tenant)
        return claimed

    def _deliver_in_slot(self, msg: WebhookMessage) -> None:
        try:
            self._deliver(msg)
        except Exception:
            log.exception("webhook %s: delivery failed unexpectedly; its claim expires and it is tried again", msg.id)
        finally:
            self._slots.give_back(msg.tenant)

    def _secret(self, tenant: str) -> str | None:
        """The tenant's signing secret (cached for SECRET_CACHE_S when present; None is never cached)."""
        cached = self._secrets.get(tenant)
        if cached is not None and time.monotonic() - cached[1] < SECRET_CACHE_S:
            return cached[0]
        with transaction(self.sessions) as session:
            secret = tenant_secret(session=session, tenant=tenant)
        if secret:
            self._secrets[tenant] = (secret, time.monotonic())
            return secret
        self._secrets.pop(tenant, None)
        return None

    def _deliver(self, msg: WebhookMessage) -> None:
        secret = self._secret(msg.tenant)
        if secret is None:
            self._record(msg, _no_secret(msg.tenant), attempted=False)
            return
        body = msg.payload.encode()
        stamp = int(time.time())
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "webhook-id": msg.id,
            "webhook-timestamp": str(stamp),
            "webhook-signature": sign(secret=secret, msg_id=msg.id, timestamp_s=stamp, body=body),
        }
        self._record(msg, self._post(msg, body, headers), attempted=True)

    def _post(self, msg: WebhookMessage, body: bytes, headers: dict[str, str]) -> str | None:
        """Send one attempt; None when the receiver took it (2xx), else what went wrong."""
        s = self.settings
        try:
            address = self._resolver.public_address(
                msg.url, tenant=msg.tenant, timeout_s=s.webhook_dns_timeout_s, allow_private=s.webhook_allow_private
            )
            status = post_signed(
                url=msg.url, address=address, body=body, headers=headers, timeout_s=s.webhook_timeout_s
            )
        except (OSError, http.client.HTTPException, InvalidInput) as e:
            return f"{type(e).__name__}: {e}"
        return None if 200 <= status < 300 else f"HTTP {status}"

    def _record(self, msg: WebhookMessage, error: str | None, *, attempted: bool) -> None:
        """Write the outcome: delivered, or the error and when to try again (a wait for a secret is no attempt)."""
        now = utcnow()
        attempts = msg.attempts + 1 if attempted else msg.attempts
        values: dict[str, object] = {"attempts": attempts}
        if error is None:
            values["delivered_at"] = now
        else:
            values["last_error"] = error[:MAX_ERROR_CHARS]
            values.update(self._retry_values(msg, now, attempts=max(1, attempts)))
            log.info("webhook %s to %s not delivered (attempt %d): %s", msg.id, msg.url, attempts, error)
        with transaction(self.sessions) as session:
            session.execute(update(WebhookMessage).where(WebhookMessage.id == msg.id).values(**values))

    def _retry_values(self, msg: WebhookMessage, now: datetime, *, attempts: int) -> dict[str, object]:
        s = self.settings
        if now - msg.created_at > timedelta(seconds=s.webhook_give_up_s):
            return {"failed_at": now}
        when = next_attempt_at(attempts=attempts, now=now, base_s=s.webhook_retry_base_s, max_s=s.webhook_retry_max_s)
        return {"next_attempt_at": when}


def _no_secret(tenant: str) -> str:
    return (
        f"not sent: tenant {tenant!r} has no webhook signing secret yet, and an unsigned webhook proves nothing; "
        f"`ipab keys create --tenant {tenant}` (or applying its plan again) creates it, shown once; "
        "the message goes once it exists"
    )
