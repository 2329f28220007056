"""A hostile tenant, from a process of its own, for the benchmark that measures what it does to
another tenant: image bombs, huge batches, webhooks to an endpoint that never answers and to a
host whose DNS never answers, each from threads that send again as soon as they have an answer
(429s and their Retry-After ignored). The gallery flood is `devkit.flood.Flood`'s.

Its own process for the reason `devkit.flood` gives (the GIL of the measuring process). Like a
`Flood`, it starts paused; `resume()` returns once every attack has sent, and `stop()` returns
what each attack got: answers by status, and the median and slowest answer.
"""

from __future__ import annotations

import io
import json
import statistics
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from typing import Any, Final

import httpx

from devkit.flood import SPAWN, WAIT_S, Shared, wait_until

MIB: Final = 1024 * 1024
JSONL: Final = {"content-type": "application/jsonl"}
SMALL: Final = {"steps": 2, "width": 64, "height": 64}
DEAD_BATCH_ROWS: Final = 50
BOMB_SIDE_PX: Final = 8192


@dataclass(frozen=True)
class HostilePlan:
    """What the hostile tenant sends, and where."""

    url: str
    headers: dict[str, str]
    reference: str  # one of its valid reference ids, for valid rows
    dead_url: str  # a webhook endpoint that accepts and never answers
    silent_url: str | None  # a webhook URL whose host's DNS never answers; None: that attack is left out
    invalid_batch_mib: int = 32  # `{"prompt":1}` lines, every one invalid
    max_batch_rows: int = 99_000  # valid rows, padded to about max_batch_mib
    max_batch_mib: int = 60
    bomb_threads: int = 3
    only: tuple[
        str, ...
    ] = ()  # attacks to run, by name (bomb, invalid_batch, max_batch, dead_webhooks, slow_dns); () for all


@dataclass
class _Tally:
    """One attack's answers (one thread writes each)."""

    statuses: Counter[str] = field(default_factory=Counter)
    seconds: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "statuses": dict(self.statuses),
            "median_s": statistics.median(self.seconds) if self.seconds else None,
            "max_s": max(self.seconds) if self.seconds else None,
        }


def _png(mode: str) -> bytes:
    """An 8192x8192 PNG of one colour: tens of KB on the wire, hundreds of MiB once decoded to RGB."""
    from PIL import Image

    out = io.BytesIO()
    Image.new(mode, (BOMB_SIDE_PX, BOMB_SIDE_PX)).save(out, "PNG")
    return out.getvalue()


def _valid_rows(reference: str, rows: int, target_bytes: int) -> bytes:
    bare = len(json.dumps({"references": [reference], "prompt": "", "seed": 0, **SMALL})) + 12
    pad = "x" * max(0, min(1900, target_bytes // max(rows, 1) - bare))
    lines = (json.dumps({"references": [reference], "prompt": f"{pad} {i}", "seed": i, **SMALL}) for i in range(rows))
    return ("\n".join(lines) + "\n").encode()


Attack = Callable[[httpx.Client], int]


def _attacks(plan: HostilePlan) -> dict[str, Attack]:
    """Each attack: one round of it (its status: the first request's)."""
    palette, one_bit = _png("P"), _png("1")
    invalid = b'{"prompt":1}\n' * (plan.invalid_batch_mib * MIB // 13)
    valid = _valid_rows(plan.reference, plan.max_batch_rows, plan.max_batch_mib * MIB)
    dead_rows = _valid_rows(plan.reference, DEAD_BATCH_ROWS, 0)
    dead_job = {"references": [plan.reference], "prompt": "p", **SMALL, "webhook": {"url": plan.dead_url}}

    def post_batch(http: httpx.Client, body: bytes, params: dict[str, str] | None = None) -> httpx.Response:
        return http.post("/v1/batches", content=body, headers=JSONL, params=params)

    def max_batch(http: httpx.Client) -> int:
        answer = post_batch(http, valid, {"webhook_url": plan.dead_url})
        if answer.status_code == 202:  # cancel it, so that the cap lets the next one in
            http.post(f"/v1/batches/{answer.json()['id']}/cancel")
        return answer.status_code

    def dead_webhooks(http: httpx.Client) -> int:
        job = http.post("/v1/jobs", json=dead_job)
        if job.status_code == 202:  # canceled: its job.canceled event goes to the dead endpoint
            http.post(f"/v1/jobs/{job.json()['id']}/cancel")
        batch = post_batch(http, dead_rows, {"webhook_url": plan.dead_url})
        if batch.status_code == 202:
            http.post(f"/v1/batches/{batch.json()['id']}/cancel")
        return job.status_code

    def bomb(png: bytes) -> Attack:
        return lambda http: _upload(http, png)

    attacks: dict[str, Attack] = {
        **{f"bomb_{i}": bomb((palette, one_bit)[i % 2]) for i in range(plan.bomb_threads)},
        "invalid_batch": lambda http: post_batch(http, invalid).status_code,
        "max_batch": max_batch,
        "dead_webhooks": dead_webhooks,
    }
    silent_url = plan.silent_url
    if silent_url is not None:
        silent_job = {"references": [plan.reference], "prompt": "p", "webhook": {"url": silent_url}}
        attacks["slow_dns_job"] = lambda http: http.post("/v1/jobs", json=silent_job).status_code
        attacks["slow_dns_batch"] = lambda http: post_batch(http, dead_rows, {"webhook_url": silent_url}).status_code
    return {name: a for name, a in attacks.items() if not plan.only or any(name.startswith(o) for o in plan.only)}


def _upload(http: httpx.Client, png: bytes) -> int:
    return http.post("/v1/references", files={"file": ("bomb.png", png)}).status_code


def _attacker(plan: HostilePlan, attack: Attack, shared: Shared, tally: _Tally) -> None:
    with httpx.Client(base_url=plan.url, headers=plan.headers, timeout=600) as http:
        while not shared.stop.is_set():
            if not shared.go.wait(0.1):
                continue
            with shared.in_flight.get_lock():
                shared.in_flight.value += 1
            t0 = time.perf_counter()
            try:
                status = str(attack(http))
            except httpx.HTTPError as e:
                status = type(e).__name__
            tally.seconds.append(time.perf_counter() - t0)
            tally.statuses[status] += 1
            with shared.in_flight.get_lock():
                shared.in_flight.value -= 1
            with shared.sent.get_lock():
                shared.sent.value += 1


def _hostile(plan: HostilePlan, shared: Shared) -> None:
    attacks = _attacks(plan)
    tallies = {name: _Tally() for name in attacks}
    threads = [
        threading.Thread(target=_attacker, args=(plan, attack, shared, tallies[name]), name=name)
        for name, attack in attacks.items()
    ]
    for thread in threads:
        thread.start()
    shared.out.put(len(threads))  # ready: every body is built
    for thread in threads:
        thread.join()
    shared.out.put({name: tally.summary() for name, tally in tallies.items()})


@dataclass
class Hostile:
    """The hostile tenant's attacks, each from a thread of its own process, while resumed."""

    plan: HostilePlan
    _shared: Shared = field(default_factory=Shared, init=False)
    _process: BaseProcess | None = field(default=None, init=False)
    _attacks: int = field(default=0, init=False)

    @property
    def pid(self) -> int:
        """Its process's id (once started)."""
        assert self._process is not None and self._process.pid is not None, "start() it first"
        return self._process.pid

    def start(self) -> Hostile:
        """Start its process, paused; return once every request body is built."""
        self._process = SPAWN.Process(target=_hostile, args=(self.plan, self._shared), daemon=True)
        self._process.start()
        self._attacks = int(self._shared.out.get(timeout=WAIT_S))
        return self

    def resume(self) -> None:
        """Attack; return once the first answers came."""
        start = self._shared.sent.value
        self._shared.go.set()
        if self._attacks:
            wait_until(lambda: self._shared.sent.value > start, "answer", self._process)

    def stop(self) -> dict[str, Any]:
        """Stop attacking (the requests in flight are answered first); what each attack got."""
        self._shared.go.clear()
        self._shared.stop.set()
        tallies: dict[str, Any] = self._shared.out.get(timeout=WAIT_S * 5)
        if self._process is not None:
            self._process.join(timeout=30)
        return tallies
