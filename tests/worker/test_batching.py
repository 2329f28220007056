"""Micro-batching's promises, on real SQLite, Redis and S3 with a fake model (a unit test).

Compatible queued jobs share one pipeline call and each records `render_batch_size`; an
incompatible message stays where it was; each job keeps its own failure, cancel and output;
a message taken for a batch and never claimed is handed back by the reconciler.
"""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterator

import pytest
from PIL import Image
from sqlalchemy import update

from shared import keys
from shared.db import Job
from shared.db_clock import server_now
from shared.reconcile import reconcile_once
from shared.settings import Settings
from shared.spec import JobSpec, Reference
from shared.storage import ObjectStore
from shared.wire import JobMessage
from tests.worker.conftest import (
    BATCH_SIZE,
    BatchingFakeRenderer,
    add_job,
    cancel_jobs,
    fake_context,
    job_row,
    queue_messages,
    run_published,
)
from worker.batching import BatchCollector
from worker.context import WorkerContext


@pytest.fixture
def ctx(settings: Settings, object_store: ObjectStore) -> Iterator[WorkerContext]:
    settings = settings.model_copy(update={"batch_size": BATCH_SIZE, "batch_wait_ms": 50})
    context = fake_context(settings, object_store, BatchingFakeRenderer())
    yield context
    context.close()


def _waiting(ctx: WorkerContext) -> int:
    return int(ctx.redis.llen(keys.render_queue(ctx.renderer.name)))


def test_compatible_queued_jobs_render_in_one_call_each_with_its_own_output(ctx: WorkerContext) -> None:
    first, *rest = [add_job(ctx, seed=10 + i) for i in range(BATCH_SIZE)]
    queue_messages(ctx, rest)
    assert run_published(ctx, first) == "rendered"
    assert ctx.renderer.calls == [BATCH_SIZE]  # type: ignore[attr-defined]
    assert _waiting(ctx) == 0
    for message in (first, *rest):
        job = job_row(ctx, message.job_id)
        assert (job.status, job.render_batch_size, job.attempts) == ("succeeded", BATCH_SIZE, 1)
        png = ctx.store.get(job.output_key or "")
        pixel = Image.open(io.BytesIO(png)).convert("RGB").getpixel((0, 0))
        assert isinstance(pixel, tuple) and pixel[0] == message.spec.params.seed  # its own seed
    queued = ctx.redis.smembers(ctx.settings.redis_prefix + keys.QUEUED_SET)
    assert not queued


def test_a_job_alone_records_a_batch_of_one_after_waiting_at_most_the_wait(ctx: WorkerContext) -> None:
    message = add_job(ctx)
    t0 = time.monotonic()
    assert run_published(ctx, message) == "rendered"
    assert time.monotonic() - t0 < 5.0
    assert job_row(ctx, message.job_id).render_batch_size == 1


def test_an_incompatible_message_stays_in_the_queue_in_its_place(ctx: WorkerContext) -> None:
    first = add_job(ctx, seed=1)
    other = add_job(ctx, seed=2, steps=3)  # different steps: cannot share the call
    same = add_job(ctx, seed=3)
    queue_messages(ctx, [other, same])
    assert run_published(ctx, first) == "rendered"
    assert ctx.renderer.calls == [2]  # type: ignore[attr-defined]
    assert job_row(ctx, same.job_id).render_batch_size == 2
    assert job_row(ctx, other.job_id).status == "queued"
    assert _waiting(ctx) == 1
    assert ctx.redis.sismember(ctx.settings.redis_prefix + keys.QUEUED_SET, other.job_id)


def test_a_job_whose_reference_cannot_be_read_fails_alone(ctx: WorkerContext) -> None:
    first, fine = add_job(ctx, seed=1), add_job(ctx, seed=2)
    base = add_job(ctx, seed=3)
    missing = Reference(sha256="0" * 64, key=keys.ref_key("0" * 64, "png"))  # never uploaded
    bad = JobMessage(job_id=base.job_id, batch_id=base.batch_id, spec=JobSpec(base.spec.params, (missing,)))
    queue_messages(ctx, [bad, fine])
    assert run_published(ctx, first) == "rendered"
    assert job_row(ctx, bad.job_id).status == "failed"
    for message in (first, fine):
        job = job_row(ctx, message.job_id)
        assert (job.status, job.render_batch_size) == ("succeeded", 2)


def test_a_call_that_fails_as_a_whole_reruns_its_jobs_alone_and_only_the_bad_one_fails(ctx: WorkerContext) -> None:
    first, bad, fine = add_job(ctx, seed=1), add_job(ctx, seed=13), add_job(ctx, seed=3)
    ctx.renderer.bad_seed = 13  # type: ignore[attr-defined]
    queue_messages(ctx, [bad, fine])
    assert run_published(ctx, first) == "rendered"
    assert ctx.renderer.calls == [3, 1, 1, 1]  # type: ignore[attr-defined]
    assert job_row(ctx, bad.job_id).error_type == "GpuOutOfMemory"
    for message in (first, fine):
        job = job_row(ctx, message.job_id)
        assert (job.status, job.render_batch_size) == ("succeeded", 1)


def test_a_canceled_job_leaves_the_call_at_a_step_and_the_others_go_on(ctx: WorkerContext) -> None:
    first, doomed, fine = (add_job(ctx, seed=s, steps=30) for s in (1, 2, 3))
    ctx.renderer.step_delay_s = 0.1  # type: ignore[attr-defined]
    queue_messages(ctx, [doomed, fine])
    timer = threading.Timer(
        1.0, lambda: cancel_jobs(sessions=ctx.sessions, batch_id=doomed.batch_id, job_ids=[doomed.job_id])
    )
    timer.start()
    assert run_published(ctx, first) == "rendered"
    assert job_row(ctx, doomed.job_id).status == "canceled"
    assert ctx.store.list_keys(f"outputs/{doomed.batch_id}/{doomed.job_id}") == []
    for message in (first, fine):
        job = job_row(ctx, message.job_id)
        assert (job.status, job.render_batch_size) == ("succeeded", 3)


def test_when_every_job_of_the_call_is_canceled_the_call_stops(ctx: WorkerContext) -> None:
    first, second = add_job(ctx, seed=1, steps=40), add_job(ctx, seed=2, steps=40)
    ctx.renderer.step_delay_s = 0.1  # type: ignore[attr-defined]
    queue_messages(ctx, [second])
    timer = threading.Timer(1.0, lambda: cancel_jobs(sessions=ctx.sessions, batch_id=first.batch_id))
    timer.start()
    t0 = time.monotonic()
    assert run_published(ctx, first) == "canceled"
    assert time.monotonic() - t0 < 3.5  # within a heartbeat, not after 40 steps
    assert {job_row(ctx, m.job_id).status for m in (first, second)} == {"canceled"}


def test_a_message_taken_for_a_batch_but_never_claimed_is_handed_back(ctx: WorkerContext) -> None:
    """A worker killed between taking a message and claiming its job loses nothing."""
    first, taken = add_job(ctx, seed=1), add_job(ctx, seed=2)
    queue_messages(ctx, [taken])
    with ctx.sessions.begin() as session:  # dispatched a while ago, as the dispatcher marks it
        session.execute(update(Job).where(Job.id == taken.job_id).values(enqueued_at=server_now(-60.0)))
    collector = BatchCollector(
        redis_client=ctx.redis, queue=keys.render_queue(ctx.renderer.name), prefix=ctx.settings.redis_prefix
    )
    assert [t.message.job_id for t in collector.collect(first, more=3, wait_ms=0)] == [taken.job_id]
    # ... and the worker dies here. SQL still says queued; the reconciler hands the job back.
    report = reconcile_once(sessions=ctx.sessions, redis_client=ctx.redis, settings=ctx.settings)
    assert report.reenqueued == [taken.job_id]
    assert job_row(ctx, taken.job_id).enqueued_at is None
