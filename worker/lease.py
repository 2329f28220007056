"""A running job's lease, renewed by a heartbeat thread while the job runs.

When a renewal finds the job no longer ours (canceled, or re-claimed after our lease
expired), the lease is marked lost and the denoising loop stops at its next step.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy.orm import Session, sessionmaker

from shared.errors import JobCanceled, TransientError
from shared.jobs import renew_lease

log = logging.getLogger(__name__)


class Lease:
    """Holds one attempt of one job; `check()` raises `JobCanceled` once the job is not ours."""

    def __init__(
        self, *, sessions: sessionmaker[Session], job_id: str, attempt: int, lease_s: float, heartbeat_s: float
    ) -> None:
        self.job_id = job_id
        self.attempt = attempt
        self._sessions = sessions
        self._lease_s = lease_s
        self._heartbeat_s = heartbeat_s
        self._stopped = threading.Event()
        self._lost = threading.Event()
        self._thread = threading.Thread(target=self._beat, name=f"lease-{job_id[:8]}", daemon=True)

    def start(self) -> Lease:
        """Begin renewing; returns self."""
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop renewing (the job's row no longer needs a lease)."""
        self._stopped.set()

    @property
    def lost(self) -> bool:
        """True once a renewal found the job canceled or taken over."""
        return self._lost.is_set()

    def check(self, step: int = -1) -> None:
        """Called at every denoising step: stop the job if it is no longer ours."""
        if self._lost.is_set():
            raise JobCanceled(f"job {self.job_id} was canceled or taken over (at step {step})")

    def _beat(self) -> None:
        while not self._stopped.wait(self._heartbeat_s):
            try:
                ours = renew_lease(
                    sessions=self._sessions, job_id=self.job_id, attempt=self.attempt, lease_s=self._lease_s
                )
            except TransientError as e:
                # The lease outlives a short database outage; the next beat tries again.
                log.warning("lease renewal for %s failed: %s", self.job_id, e)
                continue
            if not ours:
                self._lost.set()
                return
