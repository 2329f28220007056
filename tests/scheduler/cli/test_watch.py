"""`ipab status --watch` ends when its batch does, not up to a poll interval later."""

from __future__ import annotations

import io

import pytest

from scheduler.cli import watch
from scheduler.terminal_progress import Reporter

JOBS = 30
FIRST_S, EVERY_S = 0.35, 0.1  # job i finishes at FIRST_S + i * EVERY_S: the last at 3.25 s
LAST_S = FIRST_S + (JOBS - 1) * EVERY_S


class Clock:
    """The watch's time.monotonic and time.sleep, without waiting."""

    def __init__(self) -> None:
        self.now_s = 0.0
        self.polls: list[float] = []

    def monotonic(self) -> float:
        return self.now_s

    def sleep(self, seconds: float) -> None:
        self.now_s += seconds

    def poll(self) -> dict[str, int]:
        self.polls.append(self.now_s)
        done = sum(1 for i in range(JOBS) if FIRST_S + i * EVERY_S <= self.now_s + 1e-9)
        return {"succeeded": done, "queued": JOBS - done}


def test_the_watch_ends_when_the_batch_does(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr("scheduler.cli.watch.time.monotonic", clock.monotonic)
    monkeypatch.setattr("scheduler.cli.watch.time.sleep", clock.sleep)
    reporter = Reporter(stream=io.StringIO(), plain_interval_s=0.0)

    counts = watch.watch_counts(clock.poll, interval_s=1.0, line_of=lambda c: str(c), reporter=reporter)

    assert counts == {"succeeded": JOBS, "queued": 0}
    # Every second until the end is near, then every MIN_POLL_S: 0.1 s late at most, not 0.75.
    assert clock.polls[-1] - LAST_S <= watch.MIN_POLL_S + 1e-9, clock.polls
    assert all(b - a >= watch.MIN_POLL_S - 1e-9 for a, b in zip(clock.polls, clock.polls[1:], strict=False))
    assert len(clock.polls) <= 8


def test_the_next_poll_is_never_later_than_the_interval_nor_sooner_than_the_minimum() -> None:
    assert watch.next_poll_s(interval_s=1.0, left=10, done_since_start=0, watched_s=1.0) == 1.0  # no rate yet
    assert watch.next_poll_s(interval_s=1.0, left=100, done_since_start=10, watched_s=1.0) == 1.0
    assert watch.next_poll_s(interval_s=1.0, left=3, done_since_start=10, watched_s=1.0) == watch.MIN_POLL_S
    assert watch.next_poll_s(interval_s=1.0, left=1, done_since_start=1000, watched_s=1.0) == watch.MIN_POLL_S
    assert watch.next_poll_s(interval_s=0.05, left=1, done_since_start=1, watched_s=10.0) == 0.05  # --interval 0.05
