"""`ipab status --watch`: poll a batch's counts until every job is final, showing rate and ETA.

On a terminal a `rich` bar (done/total, jobs per second, ETA); elsewhere one plain line
each time the counts change, with the rate and ETA measured since the watch began.

A watch ends when its batch does, not up to `--interval` later: once the jobs left would be
done before the next poll at the rate seen so far, it looks every MIN_POLL_S until they are
(a few cheap reads, in the batch's last second only). A script that runs
`ipab status --watch && ipab results` then waits for the batch, not for the poll.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final

from scheduler.batches.counts import done_of
from scheduler.terminal_progress import Reporter, rate_text

Counts = dict[str, int]
MIN_POLL_S: Final = 0.1  # polls near a batch's end come at most this often


def next_poll_s(*, interval_s: float, left: int, done_since_start: int, watched_s: float) -> float:
    """Seconds until the next poll: `interval_s`, or MIN_POLL_S when the `left` jobs would be done
    before it at the rate seen since the watch began (never later than `interval_s`)."""
    if done_since_start <= 0 or watched_s <= 0 or left <= 0:
        return interval_s
    due_s = left * watched_s / done_since_start
    return min(interval_s, MIN_POLL_S) if due_s < interval_s else interval_s


def _poll_until_final(poll: Callable[[], Counts], show: Callable[[Counts], None], *, interval_s: float) -> Counts:
    started_s, done_at_start = time.monotonic(), -1
    while True:
        counts = poll()
        show(counts)
        done, total = done_of(counts), sum(counts.values())
        if done == total:
            return counts
        done_at_start = done if done_at_start < 0 else done_at_start
        watched_s = time.monotonic() - started_s
        time.sleep(
            next_poll_s(
                interval_s=interval_s, left=total - done, done_since_start=done - done_at_start, watched_s=watched_s
            )
        )


def _watch_bar(poll: Callable[[], Counts], *, interval_s: float, reporter: Reporter) -> Counts:
    counts = poll()
    with reporter.stage("jobs", total=sum(counts.values())) as stage:

        def show(counts: Counts) -> None:
            stage.update(done_of(counts), total=sum(counts.values()))

        return _poll_until_final(poll, show, interval_s=interval_s)


def _watch_lines(
    poll: Callable[[], Counts], *, interval_s: float, line_of: Callable[[Counts], str], reporter: Reporter
) -> Counts:
    started_s, shown, at_start = time.monotonic(), [""], [-1]

    def show(counts: Counts) -> None:
        total, done = sum(counts.values()), done_of(counts)
        if at_start[0] < 0:
            at_start[0] = done
        line = line_of(counts)
        if line != shown[0]:
            rate = rate_text(done - at_start[0], time.monotonic() - started_s, total - at_start[0])
            reporter.line(f"{line} {rate}")
            shown[0] = line

    return _poll_until_final(poll, show, interval_s=interval_s)


def watch_counts(
    poll: Callable[[], Counts], *, interval_s: float, line_of: Callable[[Counts], str], reporter: Reporter
) -> Counts:
    """Poll until every job is final; returns the last counts. `line_of` makes the plain line."""
    if reporter.interactive:
        return _watch_bar(poll, interval_s=interval_s, reporter=reporter)
    return _watch_lines(poll, interval_s=interval_s, line_of=line_of, reporter=reporter)
