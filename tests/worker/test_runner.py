"""The job runner's promises, on real SQLite, Redis and S3 with a fake model (a unit test).

Leases and fences, duplicate deliveries, cancellation at a step, permanent vs transient
errors, out-of-memory, bounded attempts and `ipab retry`.
"""

from __future__ import annotations

import hashlib
import json
import time
from typing import Any

import pytest
import torch
from PIL import Image
from sqlalchemy import select, update

from scheduler.batches.actions import retry_failed
from scheduler.usage.quotas import check_quotas
from shared import keys
from shared.db import Batch, Job
from shared.errors import JobCanceled
from shared.jobs import JobResult, claim_job, expire_leases, finish_job
from shared.logs import bound_job, unbind_job
from tests.shared.conftest import engine_events
from tests.worker.conftest import add_job, cancel_jobs, encode_png, job_row
from worker.context import WorkerContext
from worker.runner import run_job


def run_and_publish(ctx: WorkerContext, raw: Any) -> str:
    outcome = run_job(ctx, raw)
    assert ctx.publisher.drain(timeout_s=30)
    return outcome


def test_a_job_succeeds_with_its_output_stored_and_recorded(ctx: WorkerContext) -> None:
    message = add_job(ctx)
    assert run_and_publish(ctx, message.to_json()) == "rendered"
    job = job_row(ctx, message.job_id)
    assert (job.status, job.attempts, job.worker_host) == ("succeeded", 1, "test-host")
    assert job.output_key == keys.output_key(message.batch_id, message.job_id, 1)
    png = ctx.store.get(job.output_key)
    assert hashlib.sha256(png).hexdigest() == job.output_sha256 and job.output_bytes == len(png)
    assert job.denoise_s is not None and job.upload_s is not None
    assert json.loads(job.cache_stats or "{}")["encodes"] == 1


def test_a_job_costs_the_database_its_claim_and_its_finish_and_nothing_to_note_it(ctx: WorkerContext) -> None:
    # The tenant and the queue wait that log lines and metrics note come back with the claim: a read
    # of the row after it was three more round trips to the central database for every job.
    message = add_job(ctx)
    statements: list[str] = []

    def statement(_conn: Any, _cursor: Any, sql: str, *_: Any) -> None:
        statements.append(sql.split(None, 1)[0].upper())

    unbind_job()
    with engine_events(ctx.sessions.kw["bind"], {"before_cursor_execute": statement}):
        assert run_and_publish(ctx, message.to_json()) == "rendered"
    fields = bound_job()
    unbind_job()
    assert statements.count("UPDATE") == 2 and "SELECT" not in statements, statements  # claim, finish (+ rollup)
    with ctx.sessions() as session:
        tenant = session.scalars(select(Batch.tenant).where(Batch.id == message.batch_id)).one()
    assert fields.get("tenant") == tenant and fields.get("batch_id") == message.batch_id, fields


def test_a_redelivered_finished_job_writes_nothing_again(ctx: WorkerContext) -> None:
    message = add_job(ctx)
    run_and_publish(ctx, message.to_json())
    before = job_row(ctx, message.job_id)
    assert run_and_publish(ctx, message.to_json()) == "skipped"
    after = job_row(ctx, message.job_id)
    assert (after.status, after.attempts, after.finished_at) == ("succeeded", 1, before.finished_at)


def test_a_zombie_attempt_cannot_overwrite_the_newer_one(ctx: WorkerContext) -> None:
    message = add_job(ctx)
    first = claim_job(sessions=ctx.sessions, job_id=message.job_id, worker_host="zombie", lease_s=60, max_attempts=3)
    # The zombie's lease runs out; another worker takes the job over.
    with ctx.sessions.begin() as session:
        session.execute(update(Job).where(Job.id == message.job_id).values(lease_expires_at=Job.started_at))
    second = claim_job(sessions=ctx.sessions, job_id=message.job_id, worker_host="new", lease_s=60, max_attempts=3)
    assert (first, second) == (1, 2)
    late = JobResult(output_key="x", output_sha256="0" * 64, output_bytes=1, encode_s=0, denoise_s=0, upload_s=0)
    assert not finish_job(sessions=ctx.sessions, job_id=message.job_id, attempt=1, result=late)
    assert finish_job(sessions=ctx.sessions, job_id=message.job_id, attempt=2, result=late)


def test_bad_parameters_in_a_hand_made_message_fail_the_job_at_once(ctx: WorkerContext) -> None:
    message = add_job(ctx)
    raw = message.to_json()
    raw["spec"]["params"]["steps"] = 0
    assert run_and_publish(ctx, raw) == "failed"
    job = job_row(ctx, message.job_id)
    assert (job.status, job.attempts, job.error_type) == ("failed", 1, "InvalidInput")
    assert "`steps` is 0" in (job.error_message or "")


def test_a_message_that_is_not_a_job_is_dropped(ctx: WorkerContext) -> None:
    assert run_and_publish(ctx, {"v": 1, "job_id": "not-a-uuid"}) == "dropped"
    assert run_and_publish(ctx, "garbage") == "dropped"


def test_out_of_memory_fails_the_job_and_the_worker_serves_on(ctx: WorkerContext) -> None:
    oom, fine = add_job(ctx), add_job(ctx, seed=8)
    ctx.renderer.fail_with = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")  # type: ignore[attr-defined]
    assert run_and_publish(ctx, oom.to_json()) == "failed"
    ctx.renderer.fail_with = None  # type: ignore[attr-defined]
    assert run_and_publish(ctx, fine.to_json()) == "rendered"
    failed = job_row(ctx, oom.job_id)
    assert failed.error_type == "GpuOutOfMemory" and "out of memory" in (failed.error_message or "")
    assert job_row(ctx, fine.job_id).status == "succeeded"


def test_a_running_job_canceled_stops_at_a_step_and_leaves_no_output(ctx: WorkerContext) -> None:
    message = add_job(ctx, steps=40)
    ctx.renderer.step_delay_s = 0.1  # type: ignore[attr-defined]
    import threading

    timer = threading.Timer(1.0, lambda: cancel_jobs(sessions=ctx.sessions, batch_id=message.batch_id))
    timer.start()
    t0 = time.monotonic()
    assert run_and_publish(ctx, message.to_json()) == "canceled"
    assert time.monotonic() - t0 < 3.0  # stopped within a heartbeat, not after 40 steps
    assert job_row(ctx, message.job_id).status == "canceled"
    assert ctx.store.list_keys(f"outputs/{message.batch_id}/") == []


def test_a_job_that_keeps_losing_its_worker_fails_after_max_attempts(ctx: WorkerContext) -> None:
    message = add_job(ctx)
    for attempt in range(1, ctx.settings.max_attempts + 1):
        assert (
            claim_job(sessions=ctx.sessions, job_id=message.job_id, worker_host="w", lease_s=0, max_attempts=9)
            == attempt
        )
        time.sleep(0.01)
        requeued, failed = expire_leases(sessions=ctx.sessions, max_attempts=ctx.settings.max_attempts)
    assert failed == [message.job_id] and requeued == []
    job = job_row(ctx, message.job_id)
    assert (job.status, job.error_message) == ("failed", f"worker lost {ctx.settings.max_attempts} times")
    # `ipab retry --failed` gives it a fresh budget; the attempt number (the fence) only grows.
    assert retry_failed(sessions=ctx.sessions, batch_id=message.batch_id, within_quotas=check_quotas) == [
        message.job_id
    ]
    assert run_and_publish(ctx, message.to_json()) == "rendered"
    job = job_row(ctx, message.job_id)
    assert (job.status, job.attempts) == ("succeeded", ctx.settings.max_attempts + 1)


def test_a_job_canceled_before_it_starts_never_runs(ctx: WorkerContext) -> None:
    message = add_job(ctx)
    assert cancel_jobs(sessions=ctx.sessions, batch_id=message.batch_id) == 1
    assert run_and_publish(ctx, message.to_json()) == "skipped"
    assert job_row(ctx, message.job_id).attempts == 0


def test_cancel_raises_at_the_next_step_once_the_lease_is_lost() -> None:
    from worker.lease import Lease

    lease = Lease(sessions=None, job_id="j", attempt=1, lease_s=1, heartbeat_s=0.5, max_lease_s=9)  # type: ignore[arg-type]
    lease._lost.set()
    with pytest.raises(JobCanceled, match="at step 3"):
        lease.check(3)


def test_a_job_past_its_soft_time_limit_fails_with_that_reason(ctx: WorkerContext) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    message = add_job(ctx)
    ctx.renderer.fail_with = SoftTimeLimitExceeded()  # type: ignore[attr-defined]
    assert run_and_publish(ctx, message.to_json()) == "failed"
    job = job_row(ctx, message.job_id)
    assert (job.status, job.error_type) == ("failed", "JobTimedOut")
    assert "IPAB_SOFT_TIME_LIMIT_S" in (job.error_message or "")


def test_a_soft_time_limit_during_the_hand_off_fails_the_job_and_stops_its_lease(
    ctx: WorkerContext, monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery.exceptions import SoftTimeLimitExceeded

    message = add_job(ctx)

    def interrupted(publication: Any) -> None:
        raise SoftTimeLimitExceeded()

    monkeypatch.setattr(ctx.publisher, "submit", interrupted)
    assert run_job(ctx, message.to_json()) == "failed"
    job = job_row(ctx, message.job_id)
    assert (job.status, job.error_type, job.lease_expires_at) == ("failed", "JobTimedOut", None)
    # Nothing renews it any more: the heartbeat holds no lease of this job.
    from worker.lease import _heartbeat

    assert not [lease for lease in _heartbeat()._leases if lease.job_id == message.job_id]


def test_a_late_upload_from_an_expired_attempt_leaves_the_winners_output(ctx: WorkerContext) -> None:
    from worker.lease import Lease
    from worker.publisher import Publication, Rendered

    message = add_job(ctx)

    def attempt(host: str, color: int) -> Publication:
        number = claim_job(sessions=ctx.sessions, job_id=message.job_id, worker_host=host, lease_s=60, max_attempts=3)
        assert number is not None
        lease = Lease(
            sessions=ctx.sessions, job_id=message.job_id, attempt=number, lease_s=60, heartbeat_s=1, max_lease_s=600
        )
        png = encode_png(Image.new("RGB", (8, 8), (color, 0, 0)))  # the two attempts' bytes differ
        rendered = Rendered(png=png, seed=7, encode_s=0, denoise_s=0, cache_stats="{}")
        return Publication(job_id=message.job_id, batch_id=message.batch_id, lease=lease, rendered=rendered)

    zombie = attempt("zombie", 1)
    with ctx.sessions.begin() as session:  # the zombie stalls past its lease; another worker takes over
        session.execute(update(Job).where(Job.id == message.job_id).values(lease_expires_at=Job.started_at))
    winner = attempt("winner", 2)
    ctx.publisher.publish(winner)
    ctx.publisher.publish(zombie)  # wakes up and uploads late, still believing it holds the job
    job = job_row(ctx, message.job_id)
    assert (job.status, job.attempts, job.output_sha256) == ("succeeded", 2, _sha(winner))
    assert ctx.store.list_keys(f"outputs/{message.batch_id}/") == [job.output_key]
    assert hashlib.sha256(ctx.store.get(job.output_key or "")).hexdigest() == job.output_sha256


def _sha(publication: Any) -> str:
    return hashlib.sha256(publication.rendered.png).hexdigest()


def test_a_task_in_a_process_without_context_gives_its_message_back() -> None:
    from celery.exceptions import Reject

    from worker.tasks import require_context

    with pytest.raises(Reject) as rejected:
        require_context()
    assert rejected.value.args[1] is True  # requeue (the stubs do not declare the attribute)


def test_a_running_job_notes_its_denoising_step_for_the_api(ctx: WorkerContext) -> None:
    from shared.step_progress import read_step

    ctx.renderer.step_delay_s = 0.3  # type: ignore[attr-defined]
    message = add_job(ctx, steps=4)
    assert run_and_publish(ctx, message.to_json()) == "rendered"
    noted = read_step(ctx.redis, prefix=ctx.settings.redis_prefix, job_id=message.job_id)
    assert noted is not None and noted["steps"] == 4 and 1 <= noted["step"] <= 4
