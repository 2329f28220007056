"""Publishing rendered jobs on a background thread: upload the PNG, then mark succeeded.

One publication at a time, and `submit` waits while one is pending: the model runs at
most one job ahead of storage, so a slow S3 slows the worker down instead of filling
memory. The job's lease stays held (heartbeat) until its row says `succeeded`.
"""

from __future__ import annotations

import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from shared import keys
from shared.db import JobStatus
from shared.errors import IpabError
from shared.jobs import JobResult, finish_job, job_status
from shared.retry import retry_per_settings
from shared.settings import Settings
from shared.storage import ObjectStore
from worker.failures import record_failure
from worker.lease import Lease

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from worker.runner import Rendered

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Publication:
    """A rendered job handed from the runner to the publisher."""

    job_id: str
    batch_id: str
    lease: Lease
    rendered: Rendered


class Publisher:
    """Uploads outputs and records success, one job behind the model."""

    def __init__(self, *, settings: Settings, sessions: sessionmaker[Session], store: ObjectStore) -> None:
        self._settings = settings
        self._sessions = sessions
        self._store = store
        self._pending: queue.Queue[Publication | None] = queue.Queue(maxsize=1)
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._loop, name="publisher", daemon=True)
        self._thread.start()

    def submit(self, publication: Publication) -> None:
        """Hand over a rendered job; blocks while the previous one is still being published."""
        self._idle.wait()
        self._idle.clear()
        self._pending.put(publication)

    def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until nothing is pending; True if drained within the timeout."""
        return self._idle.wait(timeout_s)

    def close(self) -> None:
        """Publish what is pending, then stop the thread."""
        self.drain()
        self._pending.put(None)
        self._thread.join()

    def _loop(self) -> None:
        while (publication := self._pending.get()) is not None:
            try:
                self.publish(publication)
            except Exception:
                log.exception("publishing %s failed; its lease will expire and it will run again", publication.job_id)
            finally:
                publication.lease.stop()
                self._idle.set()

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        return retry_per_settings(fn, what=what, settings=self._settings)

    def _fail(self, p: Publication, error: IpabError) -> None:
        record_failure(self._settings, self._sessions, job_id=p.job_id, attempt=p.lease.attempt, error=error)

    def publish(self, p: Publication) -> None:
        """Steps 7 and 8 of a job: upload to its deterministic key, then mark it succeeded."""
        png = p.rendered.png
        sha256 = hashlib.sha256(png).hexdigest()
        key = keys.output_key(p.batch_id, p.job_id)
        metadata = {"job-id": p.job_id, "seed": str(p.rendered.seed), "sha256": sha256}
        # 7. Upload (a re-run overwrites the same key with the same bytes).
        t0 = time.perf_counter()
        try:
            self._retry(lambda: self._store.put(key, png, metadata=metadata, content_type="image/png"), f"upload {key}")
        except IpabError as e:
            self._fail(p, e)
            return
        upload_s = time.perf_counter() - t0
        # 8. Mark succeeded, only if this attempt still holds the job.
        result = JobResult(
            output_key=key,
            output_sha256=sha256,
            output_bytes=len(png),
            encode_s=p.rendered.encode_s,
            denoise_s=p.rendered.denoise_s,
            upload_s=upload_s,
            cache_stats=p.rendered.cache_stats,
        )
        recorded = self._retry(
            lambda: finish_job(sessions=self._sessions, job_id=p.job_id, attempt=p.lease.attempt, result=result),
            f"mark {p.job_id} succeeded",
        )
        if not recorded and job_status(sessions=self._sessions, job_id=p.job_id) == JobStatus.canceled.value:
            # A canceled job leaves no output. (Had another attempt taken the job over,
            # it writes this same key with the same bytes, so that object stays.)
            self._retry(lambda: self._store.delete(key), f"delete {key}")
            log.info("job %s was canceled while publishing; its output was removed", p.job_id)
