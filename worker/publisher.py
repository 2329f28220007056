"""Publishing rendered jobs on a background thread: upload the PNG, then mark succeeded.

One publication at a time, and `submit` waits while one is pending: the model runs at
most one job ahead of storage, so a slow S3 slows the worker down instead of filling
memory. The job's lease stays held (heartbeat) until its row says `succeeded`.

Fencing the upload: object storage knows nothing of our attempt numbers, so a put from an
attempt whose lease expired (a stalled worker waking up) could land after the winning
attempt's and overwrite it. Each attempt therefore writes its own key,
`outputs/<batch>/<job>.<attempt>.png`, and the SQL row is the arbiter: the fenced
`finish_job` records the key of the one attempt that finished, so the object at a job's
recorded `output_key` is only ever written by the attempt whose sha256 the row holds.
Keeping one deterministic key and checking the fence before or after the put cannot give
that guarantee (the check and the put are never one atomic step). A losing attempt
deletes its own object; the winner deletes the objects earlier attempts may have left.
Only an attempt that dies between its put and its failed finish leaves an unreferenced
object behind.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

from shared import keys
from shared.errors import IpabError
from shared.jobs import JobResult, finish_job
from shared.logs import job_context
from shared.retry import retry_per_settings
from shared.settings import Settings
from shared.storage import ObjectStore
from shared.usage import AttemptUsage
from worker import metrics
from worker.failures import record_failure, record_left_job
from worker.lease import Lease

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class Rendered:
    """A rendered job waiting to be published."""

    png: bytes
    seed: int
    encode_s: float
    denoise_s: float
    cache_stats: str
    render_batch_size: int = 1  # jobs in the pipeline call that rendered this one
    provenance: str | None = None  # the worker's provenance record, JSON (worker.provenance)
    gpu_s: float = 0.0  # this attempt's device seconds (worker.metering)
    steps_run: int = 0
    pixels: int = 0  # width x height

    def usage(self) -> AttemptUsage:
        """What the attempt that rendered it used."""
        return AttemptUsage(gpu_s=self.gpu_s, steps_run=self.steps_run, pixels=self.pixels)


@dataclass(frozen=True)
class Publication:
    """A rendered job handed from the runner to the publisher."""

    job_id: str
    batch_id: str
    lease: Lease
    rendered: Rendered
    _settled: threading.Lock = field(default_factory=threading.Lock, compare=False, repr=False)

    def settle(self) -> bool:
        """Take charge of this publication's lease and outcome; True for the first caller only.

        The runner (when its hand-off was interrupted) and the publisher thread both ask: one
        atomic test-and-set decides, so the job is neither published twice nor forgotten.
        """
        return self._settled.acquire(blocking=False)


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
        """Hand over a rendered job; blocks while the previous one is still being published.

        If interrupted (an exception raised by a signal), the publication may or may not have
        been handed over: the caller settles it (`Publication.settle`) to find out who owns it.
        """
        self._idle.wait()
        self._idle.clear()
        try:
            self._pending.put_nowait(publication)
        except BaseException:
            if publication not in self._pending.queue:
                self._idle.set()  # nothing was handed over: the next submit must not wait forever
            raise

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
            if not publication.settle():  # the runner gave up on it during the hand-off
                self._idle.set()
                continue
            try:
                with job_context(publication.lease.log_fields):
                    self.publish(publication)
            except Exception:
                log.exception("publishing %s failed; its lease will expire and it will run again", publication.job_id)
            finally:
                publication.lease.stop()
                self._idle.set()

    def _retry(self, fn: Callable[[], T], what: str) -> T:
        return retry_per_settings(fn, what=what, settings=self._settings)

    def _fail(self, p: Publication, error: IpabError) -> None:
        record_failure(
            self._settings,
            self._sessions,
            job_id=p.job_id,
            attempt=p.lease.attempt,
            error=error,
            gpu_s=p.rendered.gpu_s,
        )

    def publish(self, p: Publication) -> None:
        """Steps 7-9 of a job: upload to this attempt's key, mark succeeded, tidy up."""
        png = p.rendered.png
        sha256 = hashlib.sha256(png).hexdigest()
        key = keys.output_key(p.batch_id, p.job_id, p.lease.attempt)
        # 7. Upload, unless the lease already lapsed (another attempt may hold the job).
        if not p.lease.held:
            log.warning("job %s attempt %d: lease lost before upload; not publishing", p.job_id, p.lease.attempt)
            record_left_job(self._settings, self._sessions, lease=p.lease, usage=p.rendered.usage())
            return
        t0 = time.perf_counter()
        try:
            self._upload(p, key, png, sha256)
        except IpabError as e:
            self._fail(p, e)
            return
        # 8. Mark succeeded, only if this attempt still holds the job; the row names its key.
        result = JobResult(
            output_key=key,
            output_sha256=sha256,
            output_bytes=len(png),
            encode_s=p.rendered.encode_s,
            denoise_s=p.rendered.denoise_s,
            upload_s=time.perf_counter() - t0,
            cache_stats=p.rendered.cache_stats,
            render_batch_size=p.rendered.render_batch_size,
            provenance=p.rendered.provenance,
            gpu_s=p.rendered.gpu_s,
            steps_run=p.rendered.steps_run,
            pixel_steps=p.rendered.usage().pixel_steps,
        )
        recorded = self._retry(
            lambda: finish_job(sessions=self._sessions, job_id=p.job_id, attempt=p.lease.attempt, result=result),
            f"mark {p.job_id} succeeded",
        )
        if recorded:
            metrics.job_published(result)
        else:  # canceled meanwhile (its steps are billed), or another attempt holds it (lost)
            record_left_job(self._settings, self._sessions, lease=p.lease, usage=p.rendered.usage())
        # 9. Keep only the recorded object: the winner's.
        self._tidy(p, recorded=recorded)

    def _upload(self, p: Publication, key: str, png: bytes, sha256: str) -> None:
        metadata = {"job-id": p.job_id, "seed": str(p.rendered.seed), "sha256": sha256}
        self._retry(lambda: self._store.put(key, png, metadata=metadata, content_type="image/png"), f"upload {key}")

    def _tidy(self, p: Publication, *, recorded: bool) -> None:
        """Delete the objects no row refers to: earlier attempts' (we won), or ours (we lost)."""
        if recorded:
            stale = [keys.output_key(p.batch_id, p.job_id, n) for n in range(1, p.lease.attempt)]
        else:
            # Canceled meanwhile (a canceled job leaves no output), or another attempt holds it.
            stale = [keys.output_key(p.batch_id, p.job_id, p.lease.attempt)]
            log.info("job %s attempt %d no longer held the job; its output was removed", p.job_id, p.lease.attempt)
        for key in stale:
            try:
                self._retry(functools.partial(self._store.delete, key), f"delete {key}")
            except IpabError as e:
                log.warning("could not delete the unreferenced object %s: %s", key, e)
