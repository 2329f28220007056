"""A plan gives its batches a retention through its `[set]` table, checked as every row's `expires_after` is;
the jobs of each slot keep it, and their images expire that long after each finishes. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import select

from scheduler.plans.planfile import check_set
from scheduler.plans.runner import SlotContext
from shared.db import Job
from shared.errors import InvalidInput
from shared.jobs import JobResult, claim_job, finish_job
from shared.settings import Settings
from tests.scheduler.plans.conftest import (
    Clock,
    apply,
    batch_names,
    plan_context,
    plan_fields,
    run_days,
    write_plan,
    write_reference,
)

MONTH_S = 30 * 86400


def test_a_plans_set_table_takes_a_retention_and_refuses_a_bad_one() -> None:
    assert check_set({"expires_after": "30d", "steps": 20})["expires_after"] == "30d"
    with pytest.raises(InvalidInput) as refused:
        check_set({"expires_after": "a month"})
    assert "expires_after" in str(refused.value) and "a month" in str(refused.value)


@pytest.fixture
def clock() -> Clock:
    """The day before the plan's first slot."""
    return Clock(datetime(2025, 12, 31, 12, 0))


@pytest.fixture
def ctx(settings: Settings, database_url: str, clock: Clock) -> Iterator[SlotContext]:
    """A slot context on the test's database (SQLite, then PostgreSQL)."""
    with plan_context(settings.model_copy(update={"database_url": database_url}), clock) as context:
        yield context


def _manifest(folder: Path) -> Path:
    """Three rows on one reference: two naming no retention, the last its own (2h)."""
    write_reference(folder)
    rows: list[dict[str, object]] = [
        {"reference": "ref.png", "prompt": f"p{i}", "seed": i, "steps": 2} for i in range(3)
    ]
    rows[2]["expires_after"] = "2h"
    path = folder / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def _finish(ctx: SlotContext, job_id: str) -> None:
    """As a worker finishes a job: claimed, then succeeded."""
    attempt = claim_job(sessions=ctx.sessions, job_id=job_id, worker_host="gpu", lease_s=60, max_attempts=3)
    assert attempt is not None
    done = JobResult(output_key="k", output_sha256="ab" * 32, output_bytes=1, encode_s=0, denoise_s=1, upload_s=0)
    assert finish_job(sessions=ctx.sessions, job_id=job_id, attempt=attempt, result=done)


def _jobs(ctx: SlotContext) -> list[Job]:
    with ctx.sessions() as session:
        return list(session.scalars(select(Job).order_by(Job.line)))


def test_a_slots_jobs_keep_the_plans_retention_and_expire_that_long_after_they_finish(
    ctx: SlotContext, clock: Clock, tmp_path: Path
) -> None:
    _manifest(tmp_path)
    assert apply(ctx, write_plan(tmp_path, **plan_fields(set={"expires_after": "30d"}))) == "created"

    run_days(ctx, clock, 1)

    assert batch_names(ctx.sessions) == ["nightly@2026-01-01T02:00:00+00:00"]
    queued = _jobs(ctx)
    assert [job.expires_after_s for job in queued] == [MONTH_S, MONTH_S, 7200]  # a row's own retention wins
    assert all(job.expires_at is None for job in queued)  # counted from each one's end
    for job in queued:
        _finish(ctx, job.id)
    for job in _jobs(ctx):
        assert job.finished_at is not None and job.expires_at is not None
        kept_s = (job.expires_at - job.finished_at).total_seconds()
        assert abs(kept_s - (job.expires_after_s or 0)) < 1
