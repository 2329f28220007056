"""A job's denoising step goes to Redis once it has run a while, not at its first step.

Every Redis command a job sends is paid for by the central Redis, once per job of the whole
fleet: a job that ends before the API could show a step sends none.
"""

from __future__ import annotations

import pytest

from shared.step_progress import read_step
from tests.worker.conftest import add_job, job_row
from worker import runner
from worker.context import WorkerContext


def test_a_job_that_ends_within_the_progress_interval_notes_no_step(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(runner, "PROGRESS_EVERY_S", 60.0)  # far longer than this job's few steps
    message = add_job(ctx, steps=3)
    assert runner.run_job(ctx, message.to_json()) == "rendered"
    assert ctx.publisher.drain(timeout_s=30)
    assert job_row(ctx, message.job_id).status == "succeeded"
    assert read_step(ctx.redis, prefix=ctx.settings.redis_prefix, job_id=message.job_id) is None
