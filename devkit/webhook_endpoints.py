"""Webhook endpoints on 127.0.0.1 for benchmarks: a `Receiver` that records when each event
arrives, and a `DeadEndpoint` that accepts connections and never answers.

Arrival times are `time.monotonic()`, one clock for every process of the machine, so they
compare with the sender's own.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


@dataclass(frozen=True)
class Arrival:
    """One webhook as the receiver got it."""

    at_s: float  # time.monotonic() when its body had been read
    event_type: str
    subject_id: str  # data.id: the job's (or batch's) id


class Receiver:
    """A threaded HTTP server on 127.0.0.1 that answers 204 to every POST and records it."""

    def __init__(self) -> None:
        self._arrivals: list[Arrival] = []
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                receiver._record(time.monotonic(), body)
                self.send_response(204)
                self.end_headers()

            def log_message(self, format: str, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="webhook-receiver", daemon=True)

    @property
    def url(self) -> str:
        """The URL to give as a webhook."""
        return f"http://127.0.0.1:{self._server.server_address[1]}/hook"

    def start(self) -> Receiver:
        """Serve in a thread of its own."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._server.shutdown()
        self._server.server_close()

    def _record(self, at_s: float, body: bytes) -> None:
        payload = json.loads(body)
        arrival = Arrival(at_s=at_s, event_type=str(payload["type"]), subject_id=str(payload["data"]["id"]))
        with self._cond:
            self._arrivals.append(arrival)
            self._cond.notify_all()

    def wait_for(self, subject_id: str, event_type: str, *, timeout_s: float) -> Arrival | None:
        """The first arrival of `event_type` about `subject_id`, waiting up to `timeout_s`; None if none came."""

        def found() -> Arrival | None:
            return next((a for a in self._arrivals if a.subject_id == subject_id and a.event_type == event_type), None)

        with self._cond:
            self._cond.wait_for(lambda: found() is not None, timeout=timeout_s)
            return found()


@dataclass
class DeadEndpoint:
    """A TCP listener on 127.0.0.1 that accepts every connection, reads nothing and never answers;
    connections stay open until `stop()` (a webhook sender waits out its own timeout)."""

    _sock: socket.socket = field(default_factory=lambda: socket.create_server(("127.0.0.1", 0), backlog=128))
    _held: list[socket.socket] = field(default_factory=list)
    _stopped: threading.Event = field(default_factory=threading.Event)

    @property
    def url(self) -> str:
        """The URL to give as a webhook."""
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}/hook"

    @property
    def accepted(self) -> int:
        """Connections accepted so far."""
        return len(self._held)

    def start(self) -> DeadEndpoint:
        """Accept in a thread of its own."""
        threading.Thread(target=self._accept, name="dead-endpoint", daemon=True).start()
        return self

    def _accept(self) -> None:
        self._sock.settimeout(0.2)
        while not self._stopped.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self._held.append(conn)

    def stop(self) -> None:
        """Stop accepting; close every connection held."""
        self._stopped.set()
        self._sock.close()
        for conn in self._held:
            conn.close()
