"""Nothing lost, nothing doubled: faults injected into real processes mid-batch.

Each test runs a batch of 30 jobs through real `ipab worker` processes, breaks something
while it runs (after checking that work is in flight), and then holds every job to exactly
one ending: succeeded with exactly one output object whose sha256 matches its row (or
canceled, where the test cancels). Renders are counted too: every render starts with a
claim, which increments the row's `attempts`, so the sum of attempts over the batch minus
its size is the number of re-runs, and each fault has an upper bound on them.
Lease and timeout values are short settings from the `settings` fixture, not code changes.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from devkit.services import Service
from shared import keys
from shared.db import Job, JobStatus, make_engine, make_session_factory
from shared.model_set import read_model_set
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.system.conftest import (
    Workers,
    count_status,
    ipab,
    submit,
    wait_for_batch,
    wait_until,
    worker_pool,
    write_manifest,
)

pytestmark = [pytest.mark.chaos, pytest.mark.slow]
JOBS = 30
# A cancel test's batch: `ipab cancel` starts a Python process (a second or two) while the
# workers go on; at batch 4 a fast machine ran 30 tiny jobs in that time and left none to cancel.
CANCEL_JOBS = 150


def assert_each_job_ended_once(
    settings: Settings, batch_id: str, *, max_reruns: int, allow_canceled: bool = False, rows: int = JOBS
) -> list[Job]:
    """Every job succeeded (or was canceled), succeeded jobs have exactly one matching object,
    and the batch was rendered at most `max_reruns` times more than once per job."""
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session:
        jobs = list(session.scalars(select(Job).where(Job.batch_id == batch_id)).all())
    allowed = {JobStatus.succeeded.value} | ({JobStatus.canceled.value} if allow_canceled else set())
    assert len(jobs) == rows
    assert {j.status for j in jobs} <= allowed, [(j.status, j.error_type, j.error_message) for j in jobs]
    store = ObjectStore.from_settings(settings)
    succeeded = {keys.output_key(batch_id, j.id, j.attempts): j for j in jobs if j.status == JobStatus.succeeded.value}
    assert sorted(store.list_keys(f"outputs/{batch_id}/")) == sorted(succeeded)
    for key, job in succeeded.items():
        assert job.output_key == key
        assert hashlib.sha256(store.get(key)).hexdigest() == job.output_sha256
    reruns = sum(j.attempts for j in jobs) - sum(j.attempts > 0 for j in jobs)
    assert reruns <= max_reruns, [(j.id, j.attempts) for j in jobs if j.attempts > 1]
    return jobs


def running_ids(settings: Settings, batch_id: str) -> set[str]:
    """Ids of the batch's jobs running right now."""
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session:
        where = (Job.batch_id == batch_id, Job.status == JobStatus.running.value)
        return set(session.scalars(select(Job.id).where(*where)).all())


def start_batch(settings: Settings, workers: Workers, tmp_path: Path, name: str, *, rows: int = JOBS) -> str:
    manifest = write_manifest(tmp_path, rows=rows)
    return submit(workers, manifest, name)


def test_worker_killed_mid_job_loses_nothing(system_settings: Settings, workers: Workers, tmp_path: Path) -> None:
    first = workers.start()
    batch_id = start_batch(system_settings, workers, tmp_path, "kill")
    wait_until(lambda: count_status(system_settings, batch_id, JobStatus.succeeded) >= 3, what="first results")
    wait_until(lambda: count_status(system_settings, batch_id, JobStatus.running) >= 1, what="a running job")
    workers.kill(first)
    workers.start()
    wait_for_batch(system_settings, batch_id, workers=workers)
    # The killed worker held at most two jobs (one rendering, one publishing): two re-runs.
    jobs = assert_each_job_ended_once(system_settings, batch_id, max_reruns=2)
    assert max(j.attempts for j in jobs) >= 2  # the killed job ran again
    # Its lease, not Redis, ran it again: kombu keeps no copy of a taken message (no ack emulation),
    # which it would deliver once more an hour later (its visibility timeout), the job long finished.
    client = redis.Redis.from_url(system_settings.redis_url)
    assert not client.exists("unacked", "unacked_index"), client.hgetall("unacked")


def test_flushall_mid_batch_loses_nothing(
    system_settings: Settings,
    settings_env: Callable[[Settings], dict[str, str]],
    tmp_path: Path,
    private_redis: Service,
) -> None:
    settings = system_settings.model_copy(update={"redis_url": private_redis.url})  # FLUSHALL only our own
    with worker_pool(settings, settings_env, tmp_path) as pool:
        pool.start()
        batch_id = start_batch(settings, pool, tmp_path, "flush")
        wait_until(lambda: count_status(settings, batch_id, JobStatus.succeeded) >= 3, what="first results")
        wait_until(lambda: bool(running_ids(settings, batch_id)), what="a running job")
        redis.Redis.from_url(settings.redis_url).flushall()
        wait_for_batch(settings, batch_id, workers=pool)
    # Leases live in SQL: a flush re-enqueues queued jobs, and a running one is not re-run.
    assert_each_job_ended_once(settings, batch_id, max_reruns=1)


def run_through_outage(
    settings: Settings,
    settings_env: Callable[[Settings], dict[str, str]],
    tmp_path: Path,
    server: Service,
    *,
    down_s: float,
    noticed: str,
    crash: bool = False,
) -> None:
    """A batch whose `server` goes down for `down_s` while a job runs (stopped, or `crash`: its
    processes SIGKILLed); the worker log must show `noticed` (the fault reached the work in
    flight), and each job ran at most once more."""
    with worker_pool(settings, settings_env, tmp_path) as pool:
        pool.start()
        batch_id = start_batch(settings, pool, tmp_path, f"{server.name}-outage")
        wait_until(lambda: count_status(settings, batch_id, JobStatus.succeeded) >= 3, what="first results")
        wait_until(lambda: bool(running_ids(settings, batch_id)), what="a running job")
        if crash:
            server.kill()
        else:
            server.stop()
        time.sleep(down_s)
        server.start()
        wait_for_batch(settings, batch_id, workers=pool)
        log = "\n".join(path.read_text(errors="replace") for path in sorted(tmp_path.glob("worker-*.log")))
    assert noticed in log, log[-3000:]
    assert_each_job_ended_once(settings, batch_id, max_reruns=1)


def test_redis_restart_mid_batch_loses_nothing(
    system_settings: Settings,
    settings_env: Callable[[Settings], dict[str, str]],
    tmp_path: Path,
    private_redis: Service,
) -> None:
    settings = system_settings.model_copy(update={"redis_url": private_redis.url})
    run_through_outage(settings, settings_env, tmp_path, private_redis, down_s=3, noticed="Connection refused")


def test_s3_outage_of_20_s_mid_batch_loses_nothing(
    system_settings: Settings, settings_env: Callable[[Settings], dict[str, str]], tmp_path: Path, private_s3: Service
) -> None:
    settings = system_settings.model_copy(update={"s3_endpoint_url": private_s3.url})
    ObjectStore.from_settings(settings).ensure_bucket()
    run_through_outage(settings, settings_env, tmp_path, private_s3, down_s=20, noticed="object store at")


def test_postgres_restart_mid_batch_loses_nothing(
    system_settings: Settings,
    settings_env: Callable[[Settings], dict[str, str]],
    tmp_path: Path,
    private_postgres: Service,
) -> None:
    settings = system_settings.model_copy(update={"database_url": private_postgres.url})
    run_through_outage(settings, settings_env, tmp_path, private_postgres, down_s=3, noticed="SQL database unreachable")


def test_postgres_crash_mid_batch_loses_nothing(
    system_settings: Settings,
    settings_env: Callable[[Settings], dict[str, str]],
    tmp_path: Path,
    private_postgres: Service,
) -> None:
    """Killed, PostgreSQL loses the commits it had not flushed: claims and dispatch marks commit
    without waiting for the flush (shared/jobs.py). Their jobs run again; none is lost or succeeds twice."""
    settings = system_settings.model_copy(update={"database_url": private_postgres.url})
    run_through_outage(
        settings, settings_env, tmp_path, private_postgres, down_s=3, noticed="SQL database unreachable", crash=True
    )


def test_poison_messages_do_not_stop_the_worker(system_settings: Settings, workers: Workers, tmp_path: Path) -> None:
    from shared.wire import RENDER_TASK, celery_envelope

    queue = keys.render_queue(read_model_set(system_settings.model_set or Path()).name)
    client = redis.Redis.from_url(system_settings.redis_url)
    poison = [
        b"not json at all",
        celery_envelope(task=RENDER_TASK, task_id="p1", queue=queue, args=["a string, not a job"]),
        celery_envelope(task=RENDER_TASK, task_id="p2", queue=queue, args=[{"v": 1, "job_id": "nope"}]),
        celery_envelope(task="ipab.no_such_task", task_id="p3", queue=queue, args=[]),
    ]
    client.lpush(queue, *poison)
    workers.start()
    batch_id = start_batch(system_settings, workers, tmp_path, "poison")
    wait_for_batch(system_settings, batch_id, workers=workers)
    assert_each_job_ended_once(system_settings, batch_id, max_reruns=0)
    assert workers.procs[0].poll() is None  # still serving
    log = (tmp_path / "worker-0.log").read_text()
    assert "dropping a queue item that is not JSON" in log
    assert "Unrecoverable error" not in log and "Restarting celery worker" not in log


def test_cancel_mid_batch_stops_queued_and_running_jobs(
    system_settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    workers.start()
    batch_id = start_batch(system_settings, workers, tmp_path, "cancel", rows=CANCEL_JOBS)
    wait_until(lambda: count_status(system_settings, batch_id, JobStatus.succeeded) >= 3, what="first results")

    done = ipab(workers.env, "cancel", batch_id, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    wait_for_batch(system_settings, batch_id, workers=workers)
    time.sleep(2)  # a publish in flight finishes (or removes its object) by now
    jobs = assert_each_job_ended_once(system_settings, batch_id, max_reruns=0, allow_canceled=True, rows=CANCEL_JOBS)
    canceled = {j.id for j in jobs if j.status == JobStatus.canceled.value}
    assert len(canceled) >= 10
    assert sum(j.status == JobStatus.succeeded.value for j in jobs) >= 3
    results = ipab(workers.env, "results", batch_id, "--status", "canceled", cwd=tmp_path)
    assert results.returncode == 0, results.stderr
    listed = [json.loads(line) for line in results.stdout.splitlines() if line.strip()]
    assert {row["status"] for row in listed} == {"canceled"}
    assert len(listed) == len(canceled)


# The same faults with micro-batching on: a worker holds up to four jobs of one pipeline call.
BATCHED = {"batch_size": 4, "dispatch_depth": 8, "batch_wait_ms": 50}
# At batch 4 a quiet machine ran JOBS tiny jobs between two looks for a running call, and left
# none running to kill: a longer batch keeps calls running while the test looks.
BATCHED_JOBS = CANCEL_JOBS


@pytest.fixture
def batched_settings(system_settings: Settings) -> Settings:
    return system_settings.model_copy(update=BATCHED)


def test_batched_worker_killed_mid_call_loses_nothing(
    batched_settings: Settings, settings_env: Callable[[Settings], dict[str, str]], tmp_path: Path
) -> None:
    with worker_pool(batched_settings, settings_env, tmp_path) as pool:
        first = pool.start()
        batch_id = start_batch(batched_settings, pool, tmp_path, "kill-batched", rows=BATCHED_JOBS)
        wait_until(lambda: count_status(batched_settings, batch_id, JobStatus.succeeded) >= 4, what="first results")
        wait_until(lambda: bool(running_ids(batched_settings, batch_id)), what="a running call")
        pool.kill(first)
        pool.start()
        wait_for_batch(batched_settings, batch_id, workers=pool)
    # The killed worker held at most one call of four and one publishing batch of four.
    jobs = assert_each_job_ended_once(batched_settings, batch_id, max_reruns=8, rows=BATCHED_JOBS)
    assert max(j.attempts for j in jobs) >= 2
    assert max(j.render_batch_size or 0 for j in jobs) > 1  # calls really held several jobs


def test_batched_flushall_mid_batch_loses_nothing(
    batched_settings: Settings,
    settings_env: Callable[[Settings], dict[str, str]],
    tmp_path: Path,
    private_redis: Service,
) -> None:
    settings = batched_settings.model_copy(update={"redis_url": private_redis.url})
    with worker_pool(settings, settings_env, tmp_path) as pool:
        pool.start()
        batch_id = start_batch(settings, pool, tmp_path, "flush-batched", rows=BATCHED_JOBS)
        wait_until(lambda: count_status(settings, batch_id, JobStatus.succeeded) >= 4, what="first results")
        wait_until(lambda: bool(running_ids(settings, batch_id)), what="a running call")
        redis.Redis.from_url(settings.redis_url).flushall()
        wait_for_batch(settings, batch_id, workers=pool)
    assert_each_job_ended_once(settings, batch_id, max_reruns=4, rows=BATCHED_JOBS)


def test_batched_cancel_mid_batch_stops_queued_and_running_jobs(
    batched_settings: Settings, settings_env: Callable[[Settings], dict[str, str]], tmp_path: Path
) -> None:

    with worker_pool(batched_settings, settings_env, tmp_path) as pool:
        pool.start()
        batch_id = start_batch(batched_settings, pool, tmp_path, "cancel-batched", rows=CANCEL_JOBS)
        wait_until(lambda: count_status(batched_settings, batch_id, JobStatus.succeeded) >= 4, what="first results")
        done = ipab(pool.env, "cancel", batch_id, cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        wait_for_batch(batched_settings, batch_id, workers=pool)
        time.sleep(2)
    jobs = assert_each_job_ended_once(batched_settings, batch_id, max_reruns=0, allow_canceled=True, rows=CANCEL_JOBS)
    assert sum(j.status == JobStatus.canceled.value for j in jobs) >= 10
