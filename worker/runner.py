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
from dataclasses import dataclass, field
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from shared import keys
from shared.dispatch.wake import refill_level
from shared.errors import GpuOutOfMemory, IpabError, JobCanceled, JobTimedOut, MessageInvalid, TransientError
from shared.jobs import Claim, claim, hand_back_paused
from shared.queue import forget_queued
from shared.retry import retry_per_settings
from shared.step_progress import PROGRESS_EVERY_S, record_steps
from shared.usage import AttemptUsage
from shared.wire import JobMessage, decode_ids, decode_message
from worker.batching import BatchCollector
from worker.context import WorkerContext
from worker.failures import record_failure, record_left_job
from worker.lease import Lease, max_lease_s
from worker.metering import pipeline_call
from worker.png import encode_png
from worker.publisher import Publication, Rendered

log = logging.getLogger(__name__)


@dataclass
class _Job:
    """One claimed job of a pipeline call; `outcome` is set once it left the call (failed, canceled)."""

    job_id: str
    batch_id: str
    lease: Lease
    message: JobMessage | None = None
    embeds: list[Any] = field(default_factory=list)
    encode_s: float = 0.0
    cache_stats: str = "{}"
    outcome: str | None = None


def run_job(ctx: WorkerContext, raw: Any) -> str:
    """Run one job message to its end, with up to `IPAB_BATCH_SIZE - 1` compatible queued jobs
    in the same pipeline call (`worker.batching`); returns what happened to this message's job."""
    # 1. Read the ids; a message that is not a job is dropped (there is no row to fail).
    try:
        job_id, batch_id = decode_ids(raw)
    except MessageInvalid as e:
        log.error("dropping a message that is not a job: %s", e)
        return "dropped"
    # 2. Claim the row: a duplicate delivery of a finished or running job does nothing.
    job = _start(ctx, job_id, batch_id)
    if job is None:
        return _not_claimed(ctx, job_id)
    # 3. Validate the spec again: the message may come from an older scheduler.
    _validate(ctx, job, raw)
    # 4. Micro-batching: compatible queued jobs join this one, each claimed and leased alike.
    jobs = [job, *_gather(ctx, job.message)] if job.message is not None else [job]
    # 5-9. Embeddings, denoising (one call), PNG, then upload and mark succeeded (publisher).
    _render_all(ctx, jobs)
    return job.outcome or "rendered"


def _start(ctx: WorkerContext, job_id: str, batch_id: str) -> _Job | None:
    """Claim the job and start its lease; None when the claim found it not ours to run."""
    claimed_at_s = time.monotonic()
    claimed = _claim(ctx, job_id)
    if claimed is None:
        return None
    job = _Job(job_id=job_id, batch_id=batch_id, lease=_lease(ctx, job_id, claimed.attempt, claimed_at_s))
    job.lease.start(claimed)
    return job


def _validate(ctx: WorkerContext, job: _Job, raw: Any) -> None:
    try:
        job.message = decode_message(raw)
    except BaseException as e:
        _leave(ctx, job, e)


def _gather(ctx: WorkerContext, first: JobMessage) -> list[_Job]:
    """Take and claim up to `IPAB_BATCH_SIZE - 1` queued jobs that can share `first`'s pipeline call."""
    more = ctx.settings.batch_size - 1
    if more <= 0:
        return []
    collector = BatchCollector(
        redis_client=ctx.redis, queue=keys.render_queue(ctx.renderer.name), prefix=ctx.settings.redis_prefix
    )
    jobs: list[_Job] = []
    for taken in collector.collect(first, more=more, wait_ms=ctx.settings.batch_wait_ms):
        try:
            job = _start(ctx, taken.message.job_id, taken.message.batch_id)
        except IpabError as e:  # the row stays queued; the reconciler hands its job back
            log.warning("job %s: taken for a batch but not claimed: %s", taken.message.job_id, e)
            continue
        if job is None:
            _not_claimed(ctx, taken.message.job_id)
            continue
        job.message = taken.message
        jobs.append(job)
    return jobs


def _leave(ctx: WorkerContext, job: _Job, error: BaseException) -> None:
    """The job leaves its pipeline call: its lease stops and its failure (or cancel) is recorded."""
    job.lease.stop()
    job.outcome = _record_failure(ctx, job.lease, error, pixels=_pixels(job.message))


def _pixels(message: JobMessage | None) -> int:
    """width x height of the job's image (0 when its message could not be read)."""
    return message.spec.params.width * message.spec.params.height if message is not None else 0


def _live(jobs: list[_Job]) -> list[_Job]:
    return [job for job in jobs if job.outcome is None]


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
        return _record_failure(ctx, publication.lease, e, pixels=publication.rendered.pixels)
    return "rendered"


def _claim(ctx: WorkerContext, job_id: str) -> Claim | None:
    try:
        return retry_per_settings(
            lambda: claim(
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
        # The queue has room now: the same round trip wakes the dispatcher to top it up.
        forget_queued(
            redis_client=ctx.redis,
            prefix=ctx.settings.redis_prefix,
            job_id=job_id,
            model_set=ctx.renderer.name,
            signal_at=refill_level(ctx.settings.dispatch_depth),
        )
    except Exception as e:  # Redis down: the reconciler's set is gone anyway.
        log.warning("could not update the queued set for %s: %s", job_id, e)


def _render_all(ctx: WorkerContext, jobs: list[_Job]) -> None:
    """Steps 5-9 for the jobs of one pipeline call; each job fails or is canceled on its own."""
    # 5. Embeddings: a reference that cannot be read fails its own job only.
    for job in _live(jobs):
        _embed(ctx, job)
    live = _live(jobs)
    if not live:
        return
    # 6. Denoise in one call. If the call fails as a whole (out of memory, NaN), each job runs
    # alone, so that only the job that cannot render fails.
    try:
        images, denoise_s = _generate(ctx, live)
    except JobCanceled:
        return  # every job left the call at a step (recorded by `_on_step`)
    except BaseException as e:
        if len(live) == 1 or not _worth_singles(e):
            _leave_all(ctx, live, e)
            return
        log.warning("a pipeline call of %d jobs failed (%r); rendering them one at a time", len(live), e)
        for job in live:
            _render_all(ctx, [job])
        return
    # 7-9. PNG and hand-off, per job still in the call.
    for job, image in zip(live, images, strict=True):
        if job.outcome is None:
            _publish(ctx, job, image, denoise_s=denoise_s, render_batch_size=len(live))


def _embed(ctx: WorkerContext, job: _Job) -> None:
    assert job.message is not None
    t0 = time.perf_counter()
    try:
        embeds, stats = ctx.cache.get([(ref.sha256, _loader(ctx, ref.key)) for ref in job.message.spec.references])
    except BaseException as e:
        _leave(ctx, job, e)
        return
    job.embeds, job.encode_s = list(embeds), time.perf_counter() - t0
    job.cache_stats = json.dumps(stats.to_json())


def _generate(ctx: WorkerContext, jobs: list[_Job]) -> tuple[list[Any], float]:
    """One pipeline call for the jobs; every job is checked at every step (its own cancel)."""
    items = [(job.message.spec.params, job.embeds) for job in jobs if job.message is not None]
    on_step = _on_step(ctx, jobs)
    t0 = time.perf_counter()
    # The call's device time, split between its jobs (worker.metering).
    with pipeline_call([job.lease.meter for job in jobs], steps=items[0][0].steps):
        if len(items) == 1:
            images = [ctx.renderer.generate(items[0][0], items[0][1], on_step=on_step)]
        else:
            images = ctx.renderer.generate_batch(items, on_step=on_step)
    return images, time.perf_counter() - t0


def _on_step(ctx: WorkerContext, jobs: list[_Job]) -> Callable[[int], None]:
    """A canceled job leaves the call at the next step; the call stops once no job is left.

    The departed job's rows ride along in the tensors until the call ends (the schedulers keep
    per-batch state, so the batch cannot shrink mid-call); the others' images are unchanged.
    """

    # The first note comes PROGRESS_EVERY_S into the call, not at its first step: a job shorter
    # than that shows no step (only that it runs), and its SET was one more Redis command per
    # job for the whole fleet (bench/control_plane.py).
    noted_at_s = [time.monotonic()]

    def check(step: int) -> None:
        for job in _live(jobs):
            try:
                job.lease.check(step)
            except JobCanceled as e:
                job.lease.meter.leave(steps_run=step + 1)  # `step` is the index of the step just done
                _leave(ctx, job, e)
        if not _live(jobs):
            raise JobCanceled(f"every job of this pipeline call left it (at step {step})")
        if time.monotonic() - noted_at_s[0] >= PROGRESS_EVERY_S:
            noted_at_s[0] = time.monotonic()
            _note_steps(ctx, _live(jobs), step)

    return check


def _note_steps(ctx: WorkerContext, jobs: list[_Job], step: int) -> None:
    """Where each job's denoising stands, for the API (best effort, in Redis)."""
    steps = {job.job_id: (step + 1, job.message.spec.params.steps) for job in jobs if job.message is not None}
    record_steps(ctx.redis, prefix=ctx.settings.redis_prefix, steps=steps, ttl_s=ctx.settings.lease_s)


def _worth_singles(error: BaseException) -> bool:
    """Whether a failed pipeline call is worth retrying job by job: not for a time limit or a shutdown."""
    return isinstance(error, Exception) and not isinstance(error, SoftTimeLimitExceeded | TransientError)


def _leave_all(ctx: WorkerContext, jobs: list[_Job], error: BaseException) -> None:
    """Every job of the call fails with the call's error; a shutdown signal still surfaces."""
    surfaced: BaseException | None = None
    for job in jobs:
        try:
            _leave(ctx, job, error)
        except BaseException as e:  # `_record_failure` re-raises what is not a job's failure
            job.outcome = "interrupted"
            surfaced = e
    if surfaced is not None:
        raise surfaced


def _publish(ctx: WorkerContext, job: _Job, image: Any, *, denoise_s: float, render_batch_size: int) -> None:
    """Steps 7-9: the PNG, then the hand-off to the publisher (upload, mark succeeded)."""
    assert job.message is not None
    params = job.message.spec.params
    try:
        png = encode_png(image, params=params, model_set=ctx.renderer.name, provenance=ctx.provenance)
    except BaseException as e:
        _leave(ctx, job, e)
        return
    rendered = Rendered(
        png=png,
        seed=params.seed,
        encode_s=job.encode_s,
        denoise_s=denoise_s,
        cache_stats=job.cache_stats,
        render_batch_size=render_batch_size,
        provenance=ctx.provenance.to_text() if ctx.provenance else None,
        gpu_s=job.lease.meter.seconds(),
        steps_run=job.lease.meter.steps_run,
        pixels=_pixels(job.message),
    )
    publication = Publication(job_id=job.job_id, batch_id=job.batch_id, lease=job.lease, rendered=rendered)
    job.outcome = _hand_off(ctx, publication)


def _loader(ctx: WorkerContext, key: str) -> Callable[[], bytes]:
    def load() -> bytes:
        return retry_per_settings(lambda: ctx.store.get(key), what=f"download {key}", settings=ctx.settings)

    return load


def _record_failure(ctx: WorkerContext, lease: Lease, error: BaseException, *, pixels: int) -> str:
    job_id, attempt, meter = lease.job_id, lease.attempt, lease.meter
    if isinstance(error, JobCanceled):
        log.info("job %s stopped: %s", job_id, error)
        usage = AttemptUsage(gpu_s=meter.seconds(), steps_run=meter.steps_run, pixels=pixels)
        record_left_job(ctx.settings, ctx.sessions, lease=lease, usage=usage)
        return "canceled"
    error = _as_permanent(error)
    if not isinstance(error, IpabError):
        raise error  # a programming error or a shutdown signal: let it surface
    return record_failure(
        ctx.settings, ctx.sessions, job_id=job_id, attempt=attempt, error=error, gpu_s=meter.seconds()
    )


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
