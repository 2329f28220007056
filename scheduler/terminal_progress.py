"""Progress on stderr: a `rich` bar (count, rate, ETA) on a terminal, plain lines otherwise.

Commands count their work in stages (`validate`, `upload references`, `export`, ...).
Progress never goes to stdout, whose lines scripts read (`ipab submit` prints the batch
id alone on its last line). When stderr is not a terminal (CI logs, pipes) a stage prints
a line when it starts, at most one line every `PLAIN_INTERVAL_S` while it runs, and one
when it ends, so logs stay short.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final, TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

PLAIN_INTERVAL_S: Final = 5.0


def rate_text(done: int, elapsed_s: float, total: int | None) -> str:
    """`2.5/s, ETA 12 s` (the ETA only when the total is known and something is done)."""
    if done <= 0 or elapsed_s <= 0:
        return "0/s"
    rate = done / elapsed_s
    text = f"{rate:.1f}/s" if rate < 100 else f"{rate:.0f}/s"
    if total is not None and total > done:
        text += f", ETA {(total - done) / rate:.0f} s"
    return text


class _RateColumn(ProgressColumn):
    """Items per second over the stage so far."""

    def render(self, task: Task) -> Text:
        rate = task.speed
        return Text("" if rate is None else f"{rate:.1f}/s", style="progress.data.speed")


class Stage:
    """One counted step of a command; `advance` as items finish, or `update` to a new count."""

    def __init__(self, reporter: Reporter, description: str, total: int | None) -> None:
        self.reporter = reporter
        self.description = description
        self.total = total
        self.done = 0
        self.started_s = time.monotonic()
        self._last_line_s = self.started_s
        self._bar: Progress | None = None
        self._task_id: int | None = None

    def advance(self, count: int = 1) -> None:
        """`count` more items are done."""
        self.update(self.done + count)

    def update(self, done: int, *, total: int | None = None) -> None:
        """Set the number done (and the total, when it changed)."""
        self.done = done
        if total is not None:
            self.total = total
        if self._bar is not None and self._task_id is not None:
            self._bar.update(self._task_id, completed=done, total=self.total)  # type: ignore[arg-type]
        elif self.reporter.enabled and time.monotonic() - self._last_line_s >= self.reporter.plain_interval_s:
            self._last_line_s = time.monotonic()
            self.reporter.line(self.plain_line())

    def plain_line(self, *, finished: bool = False) -> str:
        """`export: 40/100 (2.0/s, ETA 30 s)`, or `... in 12.3 s` at the end."""
        elapsed_s = time.monotonic() - self.started_s
        count = f"{self.done}/{self.total}" if self.total is not None else str(self.done)
        if finished:
            return f"{self.description}: {count} in {elapsed_s:.1f} s"
        return f"{self.description}: {count} ({rate_text(self.done, elapsed_s, self.total)})"

    def _start_bar(self, console: Console) -> None:
        self._bar = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            _RateColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self._bar.start()
        self._task_id = self._bar.add_task(self.description, total=self.total)

    def _stop_bar(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


class Reporter:
    """Where a command's stages report: a bar on a terminal, plain lines elsewhere, or nothing."""

    def __init__(
        self, *, stream: TextIO | None = None, enabled: bool = True, plain_interval_s: float = PLAIN_INTERVAL_S
    ) -> None:
        self.stream = stream
        self.enabled = enabled
        self.plain_interval_s = plain_interval_s

    @property
    def _out(self) -> TextIO:
        return self.stream if self.stream is not None else sys.stderr  # read late: tests swap sys.stderr

    @property
    def interactive(self) -> bool:
        """Whether bars are drawn (stderr is a terminal) rather than plain lines printed."""
        return self.enabled and self._out.isatty()

    def line(self, text: str) -> None:
        """One plain progress line."""
        if self.enabled:
            print(text, file=self._out, flush=True)

    @contextmanager
    def stage(self, description: str, *, total: int | None = None) -> Iterator[Stage]:
        """Count one step; the bar (or the last line) shows the final count when it ends."""
        stage = Stage(self, description, total)
        if self.interactive:
            stage._start_bar(Console(file=self._out))
        elif self.enabled:
            self.line(stage.plain_line())
        try:
            yield stage
        finally:
            if stage._bar is not None:
                stage._stop_bar()
            else:
                self.line(stage.plain_line(finished=True))


SILENT: Final = Reporter(enabled=False)
