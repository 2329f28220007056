"""The delivery tests' helpers: a local webhook receiver, outbox rows, and the delivery loop in a thread.

The receiver listens on 127.0.0.1 (a port of the test's own): `/dead/...` reads the request
and never answers until the receiver closes; any other path answers 204 at once and
records when, what headers and what body came.
"""

from __future__ import annotations

import http.server
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from scheduler.webhooks.delivery import WebhookDelivery
from shared.db import WebhookMessage, ensure_database, make_engine, make_session_factory, utcnow
from shared.jobs import transaction
from shared.settings import Settings


@dataclass(frozen=True)
class Received:
    """One delivery that the receiver answered."""

    at: float  # time.monotonic() on arrival
    path: str
    headers: dict[str, str]
    body: bytes


class Receiver:
    """A webhook receiver on 127.0.0.1: `/dead/...` hangs, anything else answers 204 at once."""

    def __init__(self) -> None:
        self.got: list[Received] = []
        self.hanging = 0  # requests to /dead open now
        self.most_hanging = 0  # the most that were open at once
        self._count = threading.Lock()
        self.closing = threading.Event()
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                if self.path.startswith("/dead"):
                    receiver.hang()
                    return
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.got.append(Received(time.monotonic(), self.path, headers, body))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def hang(self) -> None:
        """Hold a request open, unanswered, until the receiver closes."""
        with self._count:
            self.hanging += 1
            self.most_hanging = max(self.most_hanging, self.hanging)
        self.closing.wait(120)
        with self._count:
            self.hanging -= 1

    def wait_for(self, path: str, timeout_s: float) -> Received | None:
        """The first delivery to `path`, waiting at most `timeout_s` for it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [r for r in self.got if r.path == path]
            if found:
                return found[0]
            time.sleep(0.02)
        return None

    def close(self) -> None:
        """Release the hanging requests and stop listening."""
        self.closing.set()
        self.server.shutdown()
        self.server.server_close()


@contextmanager
def receiver() -> Iterator[Receiver]:
    """A `Receiver`, closed afterwards."""
    r = Receiver()
    try:
        yield r
    finally:
        r.close()


def sessions_of(settings: Settings) -> sessionmaker[Session]:
    """Sessions on the (migrated) database of `settings`."""
    ensure_database(settings.database_url)
    return make_session_factory(make_engine(settings.database_url))


def add_messages(
    sessions: sessionmaker[Session], *, tenant: str, url: str, count: int, age_s: float = 0.0
) -> list[str]:
    """`count` due outbox messages of `tenant` to `url`, due since `age_s` ago; their ids."""
    now = utcnow() - timedelta(seconds=age_s)
    ids = []
    with transaction(sessions) as session:
        for i in range(count):
            msg_id = "msg_" + uuid.uuid4().hex
            payload = json.dumps({"type": "job.succeeded", "timestamp": "t", "data": {"n": i}})
            session.add(
                WebhookMessage(
                    id=msg_id,
                    tenant=tenant,
                    url=url,
                    event_type="job.succeeded",
                    subject_id=uuid.uuid4().hex[:36],
                    payload=payload,
                    attempts=0,
                    created_at=now,
                    next_attempt_at=now,
                )
            )
            ids.append(msg_id)
    return ids


def message(sessions: sessionmaker[Session], msg_id: str) -> WebhookMessage:
    """The outbox row `msg_id` as it is now."""
    with transaction(sessions) as session:
        found = session.get(WebhookMessage, msg_id)
        assert found is not None
        session.expunge(found)
        return found


@contextmanager
def delivering(settings: Settings, sessions: sessionmaker[Session]) -> Iterator[WebhookDelivery]:
    """The delivery loop of `ipab api`, running in a thread until the block ends."""
    delivery = WebhookDelivery(settings=settings, sessions=sessions)
    stop = threading.Event()
    thread = threading.Thread(target=delivery.run, args=(stop,), name="test-webhooks", daemon=True)
    thread.start()
    try:
        yield delivery
    finally:
        stop.set()
        thread.join(timeout=60)
