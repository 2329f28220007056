"""The device time of each job: its share of every pipeline call it is in.

A pipeline call of n jobs keeps the device busy for its whole length, and each of its jobs
is charged that length divided by n, so the sum over jobs is the device's busy time. A job
that leaves a call early (canceled at a step) is charged its share up to then: its rows ride
along to the end of the call (the schedulers keep per-batch state), but it asked for no more.

The meter belongs to an attempt (`worker.lease.Lease.meter`): the heartbeat notes its
seconds so far with each renewal, so an attempt whose worker is killed still leaves what
it had used by its last heartbeat (`jobs.attempt_gpu_s`, counted as lost, not billed).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

from worker import metrics


@dataclass
class _Call:
    """A pipeline call in progress: when it started (perf_counter) and how many jobs share it."""

    started_s: float
    jobs: int


class Meter:
    """The device seconds of one attempt of one job, and the denoising steps it ran."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # the heartbeat thread reads while the render writes
        self._done_s = 0.0
        self._call: _Call | None = None
        self.steps_run = 0
        self.reported_s = 0.0  # the seconds the last successful lease renewal wrote to the row

    def seconds(self) -> float:
        """Device seconds so far, the share of a call in progress included."""
        with self._lock:
            if self._call is None:
                return self._done_s
            return self._done_s + (time.perf_counter() - self._call.started_s) / self._call.jobs

    def _enter(self, call: _Call) -> None:
        with self._lock:
            self._call = call

    def leave(self, *, steps_run: int | None = None) -> None:
        """The job leaves the call in progress (if any): its share up to now is its own."""
        with self._lock:
            if self._call is not None:
                self._done_s += (time.perf_counter() - self._call.started_s) / self._call.jobs
                self._call = None
            if steps_run is not None:
                self.steps_run = steps_run

    def _end(self, call: _Call, elapsed_s: float, *, steps_run: int | None) -> None:
        """The call ended after `elapsed_s`: this job's share of it, if it was still in it."""
        with self._lock:
            if self._call is not call:
                return
            self._done_s += elapsed_s / call.jobs
            self._call = None
            if steps_run is not None:
                self.steps_run = steps_run


@contextmanager
def pipeline_call(meters: Sequence[Meter], *, steps: int) -> Iterator[None]:
    """Charge the call's time to `meters`, split evenly; a meter that left early keeps its share so far.

    A call that returns ran `steps` for every job still in it; the device's busy time is
    counted once per call (`ipab_device_busy_seconds_total`), whatever happens to its jobs.
    """
    call = _Call(started_s=time.perf_counter(), jobs=len(meters))
    for meter in meters:
        meter._enter(call)
    finished = False
    try:
        yield
        finished = True
    finally:
        elapsed_s = time.perf_counter() - call.started_s  # once: the shares add up to it exactly
        metrics.device_busy(elapsed_s)
        for meter in meters:
            meter._end(call, elapsed_s, steps_run=steps if finished else None)
