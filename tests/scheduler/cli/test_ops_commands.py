"""`ipab cancel`, `ipab retry --failed` and `ipab reconcile` on real SQL and Redis."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from sqlalchemy import update

from scheduler.submission.submit import submit_manifest
from shared.db import Job, JobStatus, make_engine, make_session_factory
from shared.settings import Settings
from tests.scheduler.submission.conftest import Run, load_jobs, queue_length, run_ipab, write_jsonl, write_photos

MODEL_SET = "tiny-ops"


@pytest.fixture
def ops_settings(settings: Settings, tmp_path: Path) -> Settings:
    # A long grace: the reconciler leaves recently enqueued jobs alone, so what it does is exact.
    return settings.model_copy(update={"reference_roots": [tmp_path], "requeue_grace_s": 3600.0})


@pytest.fixture
def ipab(settings_env: Callable[[Settings], dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Run]:
    """`ipab(settings, *argv)`: the command in-process, on exactly these settings."""

    def run(settings: Settings, *argv: str) -> Run:
        modules = ("scheduler.cli.batches", "scheduler.cli.ops")
        return run_ipab(argv, env=settings_env(settings), monkeypatch=monkeypatch, modules=modules)

    return run


def submit_four(settings: Settings, tmp_path: Path) -> str:
    photo = write_photos(tmp_path / "photos")["chelsea"]
    rows = [{"reference": str(photo), "prompt": f"p{i}", "seed": i, "width": 64, "height": 64} for i in range(4)]
    result = submit_manifest(
        settings=settings, path=write_jsonl(tmp_path / "m.jsonl", rows), batch_name="ops", model_set_name=MODEL_SET
    )
    return result.batch_id


def set_status(settings: Settings, status: JobStatus, *, count: int) -> None:
    sessions = make_session_factory(make_engine(settings.database_url))
    ids = [j.id for j in load_jobs(settings)][:count]
    with sessions.begin() as session:
        session.execute(update(Job).where(Job.id.in_(ids)).values(status=status.value, error_type="X"))


def test_cancel_ends_every_live_job_of_the_batch(
    ops_settings: Settings, tmp_path: Path, ipab: Callable[..., Run]
) -> None:
    submit_four(ops_settings, tmp_path)
    set_status(ops_settings, JobStatus.succeeded, count=1)
    run = ipab(ops_settings, "cancel", "ops")
    assert run.code == 0 and "canceled 3 job(s)" in run.out
    assert [j.status for j in load_jobs(ops_settings)] == ["succeeded"] + ["canceled"] * 3


def test_retry_failed_requeues_the_failed_jobs_and_reconcile_restores_lost_messages(
    ops_settings: Settings, tmp_path: Path, ipab: Callable[..., Run]
) -> None:
    submit_four(ops_settings, tmp_path)
    assert queue_length(ops_settings, MODEL_SET) == 4  # all four dispatched to Redis
    set_status(ops_settings, JobStatus.failed, count=2)
    redis.Redis.from_url(ops_settings.redis_url).flushdb()  # every message is gone, Redis forgot
    run = ipab(ops_settings, "retry", "ops", "--failed")
    assert run.code == 0 and "re-queued 2 failed job(s)" in run.out
    jobs = load_jobs(ops_settings)
    assert [j.status for j in jobs] == ["queued"] * 4 and all(j.error_type is None for j in jobs)
    assert queue_length(ops_settings, MODEL_SET) == 2  # the retried ones, dispatched again
    # Past the grace period, the reconciler finds the other two missing from Redis too.
    eager = ops_settings.model_copy(update={"requeue_grace_s": 0.0})
    assert "2 re-enqueued" in ipab(eager, "reconcile").out
    assert queue_length(ops_settings, MODEL_SET) == 4
    assert "0 re-enqueued" in ipab(eager, "reconcile").out  # nothing is doubled
