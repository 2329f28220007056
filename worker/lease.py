"""A running job's lease, renewed by the process's heartbeat thread while the job runs.

When a renewal finds the job no longer ours (canceled, or re-claimed after our lease
expired), the lease is marked lost and the denoising loop stops at its next step.

A lease never outlives its maximum lifetime (`max_lease_s`, see `max_lease_s()`): past it,
the database refuses the renewal and the lease is lost, whatever path out of the job forgot
to stop it. A renewal that fails (the database unreachable) keeps the lease only until the
lease's own expiry as last written; after that another worker may hold the job.

One heartbeat thread per process renews every held lease when it falls due (each
`heartbeat_s` after it was taken or last renewed), instead of a thread per job: starting a
thread cost more than a short job's own SQL. A worker holds at most a pipeline call's jobs
(IPAB_BATCH_SIZE) and the one publishing, so one thread keeps up with all of them.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import Any

from sqlalchemy.orm import Session, sessionmaker

from shared.errors import JobCanceled, TransientError
from shared.jobs import Claim, renew_lease
from shared.logs import job_context
from shared.retry import retry_span_s
from shared.settings import Settings
from worker.metering import Meter
from worker.observe import note_claim

log = logging.getLogger(__name__)


def max_lease_s(settings: Settings) -> float:
    """The longest a job's lease is renewed after its claim, from the settings.

    The render cannot outlast IPAB_HARD_TIME_LIMIT_S (Celery kills it); the publish after it
    makes two retried calls (upload, mark succeeded), each waiting at most the retry budget
    (IPAB_TRANSIENT_RETRIES, IPAB_RETRY_BASE_S, IPAB_RETRY_MAX_S); one more IPAB_LEASE_S
    covers the calls themselves.
    """
    return settings.hard_time_limit_s + 2 * retry_span_s(settings) + settings.lease_s


class Lease:
    """Holds one attempt of one job; `check()` raises `JobCanceled` once the job is not ours."""

    def __init__(
        self,
        *,
        sessions: sessionmaker[Session],
        job_id: str,
        attempt: int,
        lease_s: float,
        heartbeat_s: float,
        max_lease_s: float,
        claimed_at_s: float | None = None,
    ) -> None:
        """`claimed_at_s`: `time.monotonic()` taken just before the claim (default: now)."""
        self.job_id = job_id
        self.attempt = attempt
        self._sessions = sessions
        self._lease_s = lease_s
        self._heartbeat_s = heartbeat_s
        self._max_lease_s = max_lease_s
        self._stopped = threading.Event()
        self._lost = threading.Event()
        claimed_s = time.monotonic() if claimed_at_s is None else claimed_at_s
        # Until when the lease is surely ours (by this host's monotonic clock): the expiry last
        # written, counted from before the call that wrote it.
        self._valid_until_s = claimed_s + lease_s
        self.due_s = 0.0  # monotonic time of the next renewal; set by start()
        self.meter = Meter()  # this attempt's device seconds, noted with each renewal
        self.log_fields: dict[str, Any] = {"job_id": job_id, "attempt": attempt}  # set by start()

    def start(self, claim: Claim | None = None) -> Lease:
        """Begin renewing; returns self. `claim`: what the claim returned, noted (`worker.observe`)."""
        self.log_fields = note_claim(job_id=self.job_id, attempt=self.attempt, claim=claim)
        self.due_s = time.monotonic() + self._heartbeat_s
        _heartbeat().add(self)
        return self

    def stop(self) -> None:
        """Stop renewing (the job's row no longer needs a lease)."""
        self._stopped.set()
        _heartbeat().remove(self)

    @property
    def lost(self) -> bool:
        """True once a renewal found the job canceled or taken over, or the lease lapsed."""
        return self._lost.is_set()

    @property
    def held(self) -> bool:
        """Whether this attempt surely still holds the job: not lost, and not past its expiry."""
        return not self._lost.is_set() and time.monotonic() < self._valid_until_s

    def check(self, step: int = -1) -> None:
        """Called at every denoising step: stop the job if it is no longer ours."""
        if self._lost.is_set():
            raise JobCanceled(f"job {self.job_id} was canceled or taken over (at step {step})")

    def renew(self) -> bool:
        """One renewal, on the heartbeat thread; False once the lease needs no more renewals."""
        if self._stopped.is_set():
            return False
        started_s = time.monotonic()
        self.due_s = started_s + self._heartbeat_s  # before the call: a failure waits a beat too
        gpu_s = self.meter.seconds()
        try:
            ours = renew_lease(
                sessions=self._sessions,
                job_id=self.job_id,
                attempt=self.attempt,
                lease_s=self._lease_s,
                max_lease_s=self._max_lease_s,
                gpu_s=gpu_s,
            )
            if ours:
                self._valid_until_s = started_s + self._lease_s
                self.meter.reported_s = gpu_s
        except TransientError as e:
            # The lease outlives a short database outage, but not its own expiry: after
            # that the reconciler may have given the job to another worker.
            ours = time.monotonic() < self._valid_until_s
            log.warning("lease renewal for %s failed (%s)%s", self.job_id, e, "" if ours else "; the lease lapsed")
        if not ours:
            self._lost.set()
            return False
        return not self._stopped.is_set()


class Heartbeat:
    """The thread that renews this process's leases, each when it falls due."""

    def __init__(self) -> None:
        self._leases: set[Lease] = set()
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._loop, name="lease-heartbeat", daemon=True)
        self._thread.start()

    def add(self, lease: Lease) -> None:
        """Renew `lease` from its `due_s` on."""
        with self._changed:
            self._leases.add(lease)
            self._changed.notify()

    def remove(self, lease: Lease) -> None:
        """Renew `lease` no more."""
        with self._changed:
            self._leases.discard(lease)

    def _due(self) -> list[Lease]:
        """Wait until a lease falls due; return those due."""
        with self._changed:
            while True:
                now = time.monotonic()
                due = [lease for lease in self._leases if lease.due_s <= now]
                if due:
                    return due
                next_s = min((lease.due_s for lease in self._leases), default=now + 3600.0)
                self._changed.wait(next_s - now)

    def _loop(self) -> None:
        while True:
            for lease in self._due():
                try:
                    with job_context(lease.log_fields):
                        keep = lease.renew()
                except Exception:  # never let one bad renewal stop every lease's heartbeat
                    log.exception("lease renewal for %s failed", lease.job_id)
                    keep = True
                if not keep:
                    self.remove(lease)


_lock = threading.Lock()
_instance: tuple[int, Heartbeat] | None = None


def _heartbeat() -> Heartbeat:
    # Per process: a prefork child inherits the parent's module state but not its threads.
    global _instance
    with _lock:
        if _instance is None or _instance[0] != os.getpid():
            _instance = (os.getpid(), Heartbeat())
        return _instance[1]
