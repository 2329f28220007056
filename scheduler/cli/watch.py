"""`ipab status --watch`: poll a batch's counts until every job is final, showing rate and ETA.

On a terminal a `rich` bar (done/total, jobs per second, ETA); elsewhere one plain line
each time the counts change, with the rate and ETA measured since the watch began.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from scheduler.batches.counts import done_of
from scheduler.terminal_progress import Reporter, rate_text

Counts = dict[str, int]


def _watch_bar(poll: Callable[[], Counts], *, interval_s: float, reporter: Reporter) -> Counts:
    counts = poll()
    with reporter.stage("jobs", total=sum(counts.values())) as stage:
        while True:
            stage.update(done_of(counts), total=sum(counts.values()))
            if done_of(counts) == sum(counts.values()):
                return counts
            time.sleep(interval_s)
            counts = poll()


def _watch_lines(
    poll: Callable[[], Counts], *, interval_s: float, line_of: Callable[[Counts], str], reporter: Reporter
) -> Counts:
    started_s, last = time.monotonic(), ""
    counts = poll()
    done_at_start = done_of(counts)
    while True:
        line = line_of(counts)
        if line != last:
            total, done = sum(counts.values()), done_of(counts)
            rate = rate_text(done - done_at_start, time.monotonic() - started_s, total - done_at_start)
            reporter.line(f"{line} {rate}")
            last = line
        if done_of(counts) == sum(counts.values()):
            return counts
        time.sleep(interval_s)
        counts = poll()


def watch_counts(
    poll: Callable[[], Counts], *, interval_s: float, line_of: Callable[[Counts], str], reporter: Reporter
) -> Counts:
    """Poll until every job is final; returns the last counts. `line_of` makes the plain line."""
    if reporter.interactive:
        return _watch_bar(poll, interval_s=interval_s, reporter=reporter)
    return _watch_lines(poll, interval_s=interval_s, line_of=line_of, reporter=reporter)
