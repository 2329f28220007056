"""The job runner: one job, as numbered steps, one named call each.

The render steps (claim, embeddings, generate, PNG) run in the task; the publish steps
(upload, mark succeeded) run on the publisher thread so the model starts the next job
while the last PNG uploads. The lease is held until the publish is done, so a job is
`succeeded` only once its object is stored, and a worker that dies mid-publish simply
loses its lease: the reconciler gives the job to another worker.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from shared.errors import GpuOutOfMemory, IpabError, JobCanceled, JobTimedOut, MessageInvalid, TransientError
from shared.jobs import claim_job, hand_back_paused
from shared.queue import forget_queued
from shared.retry import retry_per_settings
from shared.wire import JobMessage, decode_ids, decode_message
from worker.context import WorkerContext
from worker.failures import record_failure
from worker.lease import Lease, max_lease_s
from worker.png import encode_png
from worker.publisher import Publication

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Rendered:
    """A rendered job waiting to be published."""

    png: bytes
    seed: int
    encode_s: float
    denoise_s: float
    cache_stats: str
    provenance: str | None = None  # the worker's provenance record, JSON (worker.provenance)


def run_job(ctx: WorkerContext, raw: Any) -> str:
    """Run one job message to its end; returns what happened (for logs and tests)."""
    # 1. Read the ids; a message that is not a job is dropped (there is no row to fail).
    try:
        job_id, batch_id = decode_ids(raw)
    except MessageInvalid as e:
        log.error("dropping a message that is not a job: %s", e)
        return "dropped"
    # 2. Claim the row: a duplicate delivery of a finished or running job does nothing.
    claimed_at_s = time.monotonic()
    attempt = _claim(ctx, job_id)
    if attempt is None:
        return _not_claimed(ctx, job_id)
    lease = _lease(ctx, job_id, attempt, claimed_at_s)
    try:
        lease.start()
        # 3. Validate the spec again: the message may come from an older scheduler.
        message = decode_message(raw)
        # 4-6. Embeddings, denoising, PNG.
        rendered = _render(ctx, message, lease)
    except BaseException as e:
        lease.stop()
        return _record_failure(ctx, job_id, attempt, e)
    # 7-8. Upload and mark succeeded, overlapped with the next job.
    return _hand_off(ctx, Publication(job_id=job_id, batch_id=batch_id, lease=lease, rendered=rendered))


def _lease(ctx: WorkerContext, job_id: str, attempt: int, claimed_at_s: float) -> Lease:
    return Lease(
        sessions=ctx.sessions,
        job_id=job_id,
        attempt=attempt,
        lease_s=ctx.settings.lease_s,
        heartbeat_s=ctx.settings.heartbeat_s,
        max_lease_s=max_lease_s(ctx.settings),
        claimed_at_s=claimed_at_s,
    )


def _hand_off(ctx: WorkerContext, publication: Publication) -> str:
    """Give the rendered job to the publisher; if that is interrupted (a soft time limit),
    whichever side settles the publication first owns its lease and its outcome."""
    try:
        ctx.publisher.submit(publication)
    except BaseException as e:
        if not publication.settle():
            log.warning("job %s: %r during hand-off; the publisher has it", publication.job_id, e)
            return "rendered"
        publication.lease.stop()
        return _record_failure(ctx, publication.job_id, publication.lease.attempt, e)
    return "rendered"


def _claim(ctx: WorkerContext, job_id: str) -> int | None:
    try:
        return retry_per_settings(
            lambda: claim_job(
                sessions=ctx.sessions,
                job_id=job_id,
                worker_host=ctx.host,
                lease_s=ctx.settings.lease_s,
                max_attempts=ctx.settings.max_attempts,
            ),
            what=f"claim {job_id}",
            settings=ctx.settings,
        )
    finally:
        # The message is consumed either way; if the claim failed, the reconciler
        # re-enqueues the still-queued row once the database is back.
        _forget(ctx, job_id)


def _not_claimed(ctx: WorkerContext, job_id: str) -> str:
    """A duplicate delivery does nothing; a job of a paused batch waits for dispatch again."""
    try:
        if hand_back_paused(sessions=ctx.sessions, job_id=job_id):
            log.info("job %s: its batch is paused; it waits until the batch is resumed", job_id)
            return "paused"
    except TransientError as e:  # the reconciler hands it back after its grace instead
        log.warning("job %s: could not hand back a paused job: %s", job_id, e)
    return "skipped"


def _forget(ctx: WorkerContext, job_id: str) -> None:
    try:
        forget_queued(redis_client=ctx.redis, prefix=ctx.settings.redis_prefix, job_id=job_id)
    except Exception as e:  # Redis down: the reconciler's set is gone anyway.
        log.warning("could not update the queued set for %s: %s", job_id, e)


def _render(ctx: WorkerContext, message: JobMessage, lease: Lease) -> Rendered:
    params = message.spec.params
    t0 = time.perf_counter()
    embeds, stats = ctx.cache.get([(ref.sha256, _loader(ctx, ref.key)) for ref in message.spec.references])
    t1 = time.perf_counter()
    image = ctx.renderer.generate(params, embeds, on_step=lease.check)
    t2 = time.perf_counter()
    png = encode_png(image, params=params, model_set=ctx.renderer.name, provenance=ctx.provenance)
    return Rendered(
        png=png,
        seed=params.seed,
        encode_s=t1 - t0,
        denoise_s=t2 - t1,
        cache_stats=json.dumps(stats.to_json()),
        provenance=ctx.provenance.to_text() if ctx.provenance else None,
    )


def _loader(ctx: WorkerContext, key: str) -> Callable[[], bytes]:
    def load() -> bytes:
        return retry_per_settings(lambda: ctx.store.get(key), what=f"download {key}", settings=ctx.settings)

    return load


def _record_failure(ctx: WorkerContext, job_id: str, attempt: int, error: BaseException) -> str:
    if isinstance(error, JobCanceled):
        log.info("job %s stopped: %s", job_id, error)
        return "canceled"
    error = _as_permanent(error)
    if not isinstance(error, IpabError):
        raise error  # a programming error or a shutdown signal: let it surface
    return record_failure(ctx.settings, ctx.sessions, job_id=job_id, attempt=attempt, error=error)


def _as_permanent(error: BaseException) -> BaseException:
    """A device out-of-memory error fails this job only; the worker frees memory and serves on.
    A job past its soft time limit fails too (running it again would only time out again)."""
    if isinstance(error, SoftTimeLimitExceeded):
        return JobTimedOut(f"the job ran past IPAB_SOFT_TIME_LIMIT_S ({error})")
    if type(error).__name__ == "OutOfMemoryError":
        import torch

        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return GpuOutOfMemory(f"the device ran out of memory for this job: {str(error)[:300]}")
    return error
