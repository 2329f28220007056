"""A deleted batch's jobs never start, also in the moments before its deletion marks them (chunks of
1,000, or a marking whose process died: up to a janitor pass): the dispatcher leaves them out, and a
worker holding a message of one claims nothing. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import timedelta
from pathlib import Path
from typing import Final

import redis
from PIL import Image
from sqlalchemy import update
from sqlalchemy.orm import Session, sessionmaker

from scheduler.batches.deletion import request_batch_deletion, request_job_deletion
from scheduler.submission.submit import submit_manifest
from shared.db import Job, JobStatus, utcnow
from shared.dispatch.dispatcher import backlog, queued_model_sets
from shared.jobs import claim_job, transaction
from shared.keys import render_queue
from shared.settings import Settings
from shared.wire import decode_render_envelope
from tests.scheduler.submission.conftest import dispatch_all

MODEL_SET: Final = "tiny-deleted"


def _submit(settings: Settings, folder: Path, name: str, rows: int) -> tuple[str, list[str]]:
    Image.new("RGB", (16, 16), (1, 2, 3)).save(folder / "ref.png")
    manifest = folder / f"{name}.jsonl"
    manifest.write_text(
        "".join(json.dumps({"reference": "ref.png", "prompt": f"{name} {i}"}) + "\n" for i in range(rows))
    )
    result = submit_manifest(settings=settings, path=manifest, batch_name=name, model_set_name=MODEL_SET)
    return result.batch_id, [result.job_ids[line] for line in sorted(result.job_ids)]


def _claim(sessions: sessionmaker[Session], job_id: str) -> int | None:
    return claim_job(sessions=sessions, job_id=job_id, worker_host="gpu", lease_s=60, max_attempts=3)


def test_a_deleted_batchs_jobs_are_neither_dispatched_nor_claimed_before_they_are_marked(
    settings: Settings, database_url: str, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"reference_roots": [tmp_path], "database_url": database_url})
    gone, gone_jobs = _submit(settings, tmp_path, "gone", 3)
    kept, kept_jobs = _submit(settings, tmp_path, "kept", 2)
    with transaction(sessions) as session:
        assert request_batch_deletion(session=session, batch_id=gone)  # the batch alone: its jobs not marked yet

    assert [batch for batches in backlog(sessions=sessions, model_set=MODEL_SET).values() for batch, _ in batches] == [
        kept
    ]
    assert dispatch_all(settings, MODEL_SET) == 2
    client = redis.Redis.from_url(settings.redis_url)
    queued = [decode_render_envelope(item).job_id for item in client.lrange(render_queue(MODEL_SET), 0, -1)]
    client.close()
    assert sorted(queued) == sorted(kept_jobs)
    # A message of the deleted batch sent before its deletion: the worker claims nothing, the job stays queued.
    assert _claim(sessions, gone_jobs[0]) is None
    with sessions() as session:
        assert session.get(Job, gone_jobs[0]).status == JobStatus.queued.value  # type: ignore[union-attr]
    assert _claim(sessions, kept_jobs[0]) == 1

    with transaction(sessions) as session:
        assert request_batch_deletion(session=session, batch_id=kept)
    assert queued_model_sets(sessions=sessions) == []


def test_a_deleted_job_whose_lease_lapsed_is_not_run_again(
    settings: Settings, database_url: str, sessions: sessionmaker[Session], tmp_path: Path
) -> None:
    settings = settings.model_copy(update={"reference_roots": [tmp_path], "database_url": database_url})
    _, (job_id,) = _submit(settings, tmp_path, "one", 1)
    assert _claim(sessions, job_id) == 1
    with transaction(sessions) as session:
        assert request_job_deletion(session=session, job_id=job_id) == 1  # running: left to its worker
        session.execute(update(Job).where(Job.id == job_id).values(lease_expires_at=utcnow() - timedelta(seconds=5)))

    assert _claim(sessions, job_id) is None
    with sessions() as session:
        job = session.get(Job, job_id)
        assert job is not None and job.attempts == 1
