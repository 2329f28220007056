"""Python's cyclic garbage collector, paused while a large batch is parsed and written.

A 100k-row batch makes about a million objects that live until its jobs are written. While
they do, every full collection walks them all holding the GIL, and every request of every
tenant waits: measured, 4 full collections of up to 0.94 s in one 100k-row parse, and
`/healthz` stalled for as long. Those objects hold no reference cycles: reference counting
frees them, and the collector has nothing to find among them. So it is paused while any
batch is handled and resumes when the last one ends; the cyclic garbage other requests made
meanwhile is collected then. (`ipab api` freezes what start-up built for the same reason.)
"""

from __future__ import annotations

import gc
import threading
from collections.abc import Iterator
from contextlib import contextmanager


class _Pauses:
    """How many holders want the collector paused; it runs again when none does."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.holders = 0
        self.was_enabled = True

    def enter(self) -> None:
        with self.lock:
            if self.holders == 0:
                self.was_enabled = gc.isenabled()
                gc.disable()
            self.holders += 1

    def leave(self) -> None:
        with self.lock:
            self.holders -= 1
            if self.holders == 0 and self.was_enabled:
                gc.enable()


_PAUSES = _Pauses()  # the collector is the process's: so is its pause


@contextmanager
def collector_paused() -> Iterator[None]:
    """No automatic cyclic collection while the block runs (in any thread of the process)."""
    _PAUSES.enter()
    try:
        yield
    finally:
        _PAUSES.leave()
