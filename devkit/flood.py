"""Load and probes from processes of their own, for the tests and benchmarks that measure what
one request or tenant does to another's latency: `Flood` (requests back to back from many
connections) and `Probe` (a request every few milliseconds, timed).

Their own processes, because threads that send from the measuring process compete with it for
the GIL: the latency measured would be the client's, not the server's. A flood can be paused
and resumed, so that "alone" and "beside the flood" are measured in turns on a machine whose
load changes under them.
"""

from __future__ import annotations

import multiprocessing
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from multiprocessing.queues import Queue
from multiprocessing.sharedctypes import Synchronized
from multiprocessing.synchronize import Event
from typing import Any, Final

import httpx

SPAWN: Final = multiprocessing.get_context("spawn")  # no forked copy of the caller's threads and sockets
WAIT_S: Final = 120.0


@dataclass
class Shared:
    """What a load process (a flood's, a probe's, `devkit.hostile`'s) and its owner share."""

    go: Event = field(default_factory=SPAWN.Event)  # clients send while it is set
    stop: Event = field(default_factory=SPAWN.Event)
    sent: Synchronized[int] = field(default_factory=lambda: SPAWN.Value("i", 0))
    in_flight: Synchronized[int] = field(default_factory=lambda: SPAWN.Value("i", 0))
    out: Queue[Any] = field(default_factory=SPAWN.Queue)


def _client(url: str, headers: dict[str, str], path: str, shared: Shared, statuses: Counter[int]) -> None:
    with httpx.Client(base_url=url, headers=headers, timeout=60) as http:
        while not shared.stop.is_set():
            if not shared.go.wait(0.1):
                continue
            with shared.in_flight.get_lock():
                shared.in_flight.value += 1
            status = http.get(path).status_code
            statuses[status] += 1  # one Counter per client thread: no lock needed
            with shared.in_flight.get_lock():
                shared.in_flight.value -= 1
            with shared.sent.get_lock():
                shared.sent.value += 1


def _flood(url: str, headers: dict[str, str], path: str, clients: int, shared: Shared) -> None:
    counters = [Counter[int]() for _ in range(clients)]
    threads = [threading.Thread(target=_client, args=(url, headers, path, shared, c)) for c in counters]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    shared.out.put(dict(sum(counters, Counter[int]())))


def wait_until(condition: Any, what: str, process: BaseProcess | None) -> None:
    """Return once `condition()` holds; raise if the load process ended or WAIT_S passed first."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        if process is not None and not process.is_alive():
            raise RuntimeError(f"the load process ended (exit code {process.exitcode}) before it could {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"the load process did not {what} within {WAIT_S:.0f} s")
        time.sleep(0.02)


@dataclass
class Flood:
    """`clients` connections GETting `path` back to back, each as soon as its last answer came
    (429s and their Retry-After ignored: the client a limit must withstand), while resumed."""

    url: str
    headers: dict[str, str]
    path: str
    clients: int = 16
    _shared: Shared = field(default_factory=Shared, init=False)
    _process: BaseProcess | None = field(default=None, init=False)

    @property
    def pid(self) -> int:
        """Its process's id (once started)."""
        assert self._process is not None and self._process.pid is not None, "start() it first"
        return self._process.pid

    def start(self) -> Flood:
        """Start the flood's process, paused."""
        args = (self.url, self.headers, self.path, self.clients, self._shared)
        self._process = SPAWN.Process(target=_flood, args=args, daemon=True)
        self._process.start()
        return self

    def resume(self) -> None:
        """Flood, and return once its requests are coming (every client has sent some)."""
        start = self._shared.sent.value
        self._shared.go.set()
        wait_until(lambda: self._shared.sent.value >= start + 2 * self.clients, "start sending", self._process)

    def pause(self) -> None:
        """Stop sending, and return once no request of the flood is in flight."""
        self._shared.go.clear()
        wait_until(lambda: self._shared.in_flight.value == 0, "drain", self._process)

    def stop(self) -> dict[int, int]:
        """End the flood's process; how many answers of each status it got."""
        self._shared.go.clear()
        self._shared.stop.set()
        statuses: dict[int, int] = self._shared.out.get(timeout=WAIT_S)
        if self._process is not None:
            self._process.join(timeout=30)
        return statuses


def _probe(url: str, path: str, every_s: float, shared: Shared) -> None:
    latencies: list[float] = []
    with httpx.Client(base_url=url, timeout=120) as http:
        while not shared.stop.is_set():
            t0 = time.perf_counter()
            http.get(path).raise_for_status()
            latencies.append(time.perf_counter() - t0)
            with shared.sent.get_lock():
                shared.sent.value += 1
            shared.stop.wait(every_s)
    shared.out.put(latencies)


@dataclass
class Probe:
    """GET `path` every `every_s` from a process of its own, one request at a time, until `stop()`:
    how long each took (for `/healthz` while a large body is handled)."""

    url: str
    path: str = "/healthz"
    every_s: float = 0.01
    _shared: Shared = field(default_factory=Shared, init=False)
    _process: BaseProcess | None = field(default=None, init=False)

    def start(self) -> Probe:
        """Start probing, and return once the first answer came."""
        self._process = SPAWN.Process(target=_probe, args=(self.url, self.path, self.every_s, self._shared))
        self._process.daemon = True
        self._process.start()
        wait_until(lambda: self._shared.sent.value > 0, "answer", self._process)
        return self

    def stop(self) -> list[float]:
        """Stop probing; each request's latency in seconds, in order."""
        self._shared.stop.set()
        latencies: list[float] = self._shared.out.get(timeout=WAIT_S)
        if self._process is not None:
            self._process.join(timeout=30)
        return latencies
