"""One janitor works at a time, like the reconciler: of two loops started at once, one holds the
fleet-wide lock and passes, the other waits without acting; when the holder stops, the other takes over."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import redis

from shared.janitor import loop as janitor_loop
from shared.janitor.loop import JanitorReport, run_janitor
from shared.retention import DataState
from tests.shared.conftest import World

INTERVAL_S = 0.1  # the loops look often: many chances to act together, were the lock not held


class _Passes:
    """Who runs `janitor_pass`, and the most running at once."""

    def __init__(self, real: Callable[..., JanitorReport]) -> None:
        self.real = real
        self.guard = threading.Lock()
        self.running = 0
        self.most_running = 0
        self.by: list[str] = []  # the loop of each pass, in order

    def __call__(self, **kwargs: Any) -> JanitorReport:
        with self.guard:
            self.running += 1
            self.most_running = max(self.most_running, self.running)
            self.by.append(threading.current_thread().name)
        try:
            time.sleep(0.01)  # a pass takes a while: long enough for another to overlap it
            return self.real(**kwargs)
        finally:
            with self.guard:
                self.running -= 1


def _wait_until(condition: Callable[[], bool], timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def _removed(world: World, jobs: list[str]) -> bool:
    return all(getattr(world.job(j), "data_state", None) == DataState.removed.value for j in jobs)


def test_two_janitors_started_at_once_never_both_act_and_the_waiting_one_takes_over(
    world: World, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    passes = _Passes(janitor_loop.janitor_pass)
    monkeypatch.setattr(janitor_loop, "janitor_pass", passes)
    settings = world.settings.model_copy(update={"janitor_interval_s": INTERVAL_S})
    _, first_jobs = world.batch("first", jobs=2)
    world.expire(first_jobs)
    waited: dict[str, int] = {"a": 0, "b": 0}  # rounds each loop found the lock held by the other
    stops = {name: threading.Event() for name in waited}
    clients = {name: redis.Redis.from_url(redis_url, socket_timeout=10) for name in waited}  # as two processes

    def observer(name: str) -> Callable[[JanitorReport | None], None]:
        def observe(report: JanitorReport | None) -> None:
            waited[name] += report is None

        return observe

    gate = threading.Barrier(len(waited))

    def janitor(name: str) -> None:
        gate.wait()  # both start at once
        run_janitor(
            sessions=world.sessions, store=world.store, redis_client=clients[name], settings=settings,
            stop=stops[name], observe=observer(name),
        )  # fmt: skip

    loops = {name: threading.Thread(target=janitor, args=(name,), name=name) for name in waited}
    for t in loops.values():
        t.start()
    try:
        # 1. One holds the lock and does the work; the other waits, round after round.
        _wait_until(lambda: _removed(world, first_jobs) and max(waited.values()) >= 10)
        holder = passes.by[0]
        other = "b" if holder == "a" else "a"
        assert set(passes.by) == {holder} and waited[holder] == 0 and waited[other] >= 10
        # 2. The holder stops: it hands the lock over at once (not after the lock's 60 s lease), and
        # the other takes over the work.
        stops[holder].set()
        loops[holder].join(timeout=30)
        _, second_jobs = world.batch("second", jobs=2, images=("second",))  # "a" went with the first
        world.expire(second_jobs)
        _wait_until(lambda: _removed(world, second_jobs), timeout_s=10.0)
    finally:
        for name, t in loops.items():
            stops[name].set()
            t.join(timeout=30)
            clients[name].close()

    assert passes.by[-1] == other and passes.most_running == 1
