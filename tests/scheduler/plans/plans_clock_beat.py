"""Test only: `ipab beat` on a clock read from a file, so tests drive simulated days through real processes.

`python -m tests.scheduler.plans.plans_clock_beat CLOCK_FILE INTERVAL_S`, with the `IPAB_*` settings in the
environment. CLOCK_FILE holds a naive UTC ISO 8601 time that the test replaces atomically
(`write_clock` in this folder's conftest.py). Once its database is ready the process creates
`CLOCK_FILE.<pid>.ready`. SIGTERM stops it after the pass under way. The real `ipab beat`
has no such clock: its `now` is the system's. It stays a module, not a conftest fixture: tests run it as
a process of its own.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import signal
import sys
import threading
from datetime import datetime
from pathlib import Path

from scheduler.cli.common import database
from scheduler.plans.beat import run_beat
from scheduler.plans.runner import SlotContext
from shared.settings import load_settings


def main(argv: list[str]) -> int:
    """Run the beat on the file clock until SIGTERM."""
    clock_file, interval_s = Path(argv[0]), float(argv[1])

    def now() -> datetime:
        return datetime.fromisoformat(clock_file.read_text())

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # a test that waits too long for the stop asks where it is
    logging.basicConfig(level=logging.WARNING, format=f"beat {os.getpid()}: %(levelname)s %(message)s")
    settings = load_settings()
    with database(settings) as sessions:
        Path(f"{clock_file}.{os.getpid()}.ready").touch()
        run_beat(SlotContext(settings=settings, sessions=sessions, now=now), interval_s=interval_s, stop=stop)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
