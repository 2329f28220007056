"""Metering in the worker, on real SQLite, Redis and S3 with a fake model: a pipeline call's device
time is split evenly between its jobs (the sum is the device's busy time), a canceled job is billed
the steps it ran, and a failed attempt's seconds are shown as lost, never billed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from sqlalchemy import func, select

from shared.db import UsageRollup
from shared.errors import GpuOutOfMemory
from shared.settings import Settings
from shared.storage import ObjectStore
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
from worker import metrics
from worker.context import WorkerContext

PIXELS = 64 * 64


@pytest.fixture
def ctx(settings: Settings, object_store: ObjectStore) -> Iterator[WorkerContext]:
    settings = settings.model_copy(update={"batch_size": BATCH_SIZE, "batch_wait_ms": 50})
    context = fake_context(settings, object_store, BatchingFakeRenderer())
    installed = metrics.install(model_set="fake", port=0)  # the device-busy counter, read below
    yield context
    metrics._Installed.metrics = None
    context.close()
    assert installed is not None


def _busy_s() -> float:
    m = metrics._Installed.metrics
    assert m is not None
    return float(m.device_busy_seconds.labels("fake")._value.get())


def _rollup(ctx: WorkerContext) -> Any:
    with ctx.sessions() as session:
        return session.execute(
            select(func.sum(UsageRollup.images), func.sum(UsageRollup.gpu_s), func.sum(UsageRollup.lost_gpu_s))
        ).one()


def test_a_call_of_four_jobs_charges_each_a_quarter_and_they_sum_to_the_busy_time(ctx: WorkerContext) -> None:
    ctx.renderer.step_delay_s = 0.02  # type: ignore[attr-defined]
    first, *rest = [add_job(ctx, seed=10 + i, steps=10) for i in range(BATCH_SIZE)]
    queue_messages(ctx, rest)
    assert run_published(ctx, first) == "rendered"
    assert ctx.renderer.calls == [BATCH_SIZE]  # type: ignore[attr-defined]

    jobs = [job_row(ctx, m.job_id) for m in (first, *rest)]
    shares = [job.gpu_s or 0.0 for job in jobs]
    busy_s = _busy_s()
    assert busy_s >= 4 * 10 * 0.02  # four jobs' ten steps, one after the other in the fake
    assert max(shares) == pytest.approx(min(shares))  # an even split
    assert sum(shares) == pytest.approx(busy_s, rel=1e-6)
    assert {(job.steps_run, job.pixel_steps, job.lost_gpu_s) for job in jobs} == {(10, PIXELS * 10, 0.0)}
    images, gpu_s, lost_s = _rollup(ctx)
    assert (images, lost_s) == (BATCH_SIZE, 0.0) and gpu_s == pytest.approx(busy_s, rel=1e-6)


def test_a_job_canceled_in_a_call_is_billed_the_steps_it_ran_and_the_others_theirs(ctx: WorkerContext) -> None:
    first, doomed, fine = (add_job(ctx, seed=s, steps=30) for s in (1, 2, 3))
    ctx.renderer.step_delay_s = 0.05  # type: ignore[attr-defined]
    queue_messages(ctx, [doomed, fine])
    cancel = threading.Timer(
        1.0, lambda: cancel_jobs(sessions=ctx.sessions, batch_id=doomed.batch_id, job_ids=[doomed.job_id])
    )
    cancel.start()
    assert run_published(ctx, first) == "rendered"

    gone = job_row(ctx, doomed.job_id)
    assert gone.status == "canceled"
    assert gone.steps_run is not None and 0 < gone.steps_run < 30
    assert gone.pixel_steps == PIXELS * gone.steps_run
    kept = [job_row(ctx, m.job_id) for m in (first, fine)]
    assert gone.gpu_s is not None and 0 < gone.gpu_s < min(job.gpu_s or 0.0 for job in kept)
    assert {job.steps_run for job in kept} == {30}
    images, gpu_s, _ = _rollup(ctx)
    assert images == 2 and gpu_s == pytest.approx(sum(j.gpu_s or 0.0 for j in (gone, *kept)), rel=1e-6)


class FailingLate(BatchingFakeRenderer):
    """Runs every step, then runs out of memory: the attempt used the device and made nothing."""

    def generate_batch(self, items: Any, *, on_step: Any = None) -> list[Any]:
        super().generate_batch(items, on_step=on_step)
        raise GpuOutOfMemory("CUDA out of memory at the VAE")


def test_a_failed_attempts_seconds_are_lost_not_billed(settings: Settings, object_store: ObjectStore) -> None:
    context = fake_context(settings, object_store, FailingLate())
    try:
        context.renderer.step_delay_s = 0.02  # type: ignore[attr-defined]
        message = add_job(context, steps=5)
        assert run_published(context, message) == "failed"
        job = job_row(context, message.job_id)
        assert (job.status, job.gpu_s) == ("failed", None)
        assert job.lost_gpu_s >= 5 * 0.02
        images, gpu_s, lost_s = _rollup(context)
        assert (images, gpu_s) == (0, 0.0) and lost_s == pytest.approx(job.lost_gpu_s)
    finally:
        context.close()
