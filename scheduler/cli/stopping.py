"""Clean stops for the long-running control-plane loops (`ipab beat`, `ipab reconcile --loop`).

A process that is PID 1 in a container gets no default action for SIGTERM: without a handler
the kernel drops the signal and `docker stop` or Kubernetes waits out the whole grace period
before killing it. So each loop stops on SIGTERM (and SIGINT) at its next wait, finishing the
pass in hand: a beat pass or a reconcile pass is one SQL transaction at a time, safe to end
between any two.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (call from the main thread)."""
    stop = threading.Event()

    def handle(signum: int, _frame: FrameType | None) -> None:
        stop.set()

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, handle)
    return stop
