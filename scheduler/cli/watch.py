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


def _poll_until_final(poll: Callable[[], Counts], show: Callable[[Counts], None], *, interval_s: float) -> Counts:
    while True:
        counts = poll()
        show(counts)
        if done_of(counts) == sum(counts.values()):
            return counts
        time.sleep(interval_s)


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
