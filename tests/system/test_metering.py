"""Metering with real `ipab worker` processes and the tiny model on the CPU.

- The GPU-seconds of a batch's jobs add up to the time the worker's device was busy (its
  `ipab_device_busy_seconds_total`, counted once per pipeline call), within 5%, rendering one
  job per call and four: a call's time is split between its jobs, never counted per job.
- A worker killed mid-job (SIGKILL): every job is billed once, by the attempt that finished it;
  what the killed attempt had reported is shown as lost; the rollup agrees with the rows.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import func, select

from devkit.demo import write_reference_photos
from devkit.services import free_port
from shared.db import Job, JobStatus, UsageRollup, make_engine, make_session_factory
from shared.settings import Settings
from tests.system.conftest import Workers, count_status, ipab, scrape, total, wait_for_batch, wait_until, worker_pool

pytestmark = [pytest.mark.slow]
# Renders long enough that heartbeats see them (the busy time is then mostly rendering).
SIZE = {"width": 96, "height": 96, "steps": 8}


def _manifest(folder: Path, rows: int) -> Path:
    refs = write_reference_photos(folder / "refs")
    lines = [{"reference": str(refs[i % 3]), "prompt": f"metered {i}", "seed": i, **SIZE} for i in range(rows)]
    path = folder / "metered.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _submit(workers: Workers, manifest: Path, name: str) -> str:
    done = ipab(workers.env, "submit", str(manifest), "--batch", name, cwd=manifest.parent)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def _jobs(settings: Settings, batch_id: str) -> list[Job]:
    with make_session_factory(make_engine(settings.database_url))() as session:
        return list(session.scalars(select(Job).where(Job.batch_id == batch_id)))


def _rollup(settings: Settings, batch_id: str) -> Any:
    with make_session_factory(make_engine(settings.database_url))() as session:
        sums = (func.sum(UsageRollup.jobs), func.sum(UsageRollup.images), func.sum(UsageRollup.gpu_s))
        return session.execute(
            select(*sums, func.sum(UsageRollup.lost_gpu_s)).where(UsageRollup.batch_id == batch_id)
        ).one()


@pytest.mark.parametrize("batch_size", [1, 4])
def test_a_batchs_gpu_seconds_add_up_to_the_workers_busy_time(
    batch_size: int,
    system_settings: Settings,
    settings_env: Callable[[Settings], dict[str, str]],
    tmp_path: Path,
) -> None:
    rows = 12
    settings = system_settings.model_copy(update={"batch_size": batch_size, "batch_wait_ms": 200})
    port = free_port()
    with worker_pool(settings, settings_env, tmp_path) as workers:
        batch_id = _submit(workers, _manifest(tmp_path, rows), f"metered-{batch_size}")  # queued before it starts
        workers.start(IPAB_METRICS_PORT=str(port))
        wait_for_batch(settings, batch_id, workers=workers)
        busy_s = total(scrape(f"http://127.0.0.1:{port}/metrics"), "ipab_device_busy_seconds_total")

    jobs = _jobs(settings, batch_id)
    assert {job.status for job in jobs} == {JobStatus.succeeded.value}, workers.log_text()
    metered_s = sum(job.gpu_s or 0.0 for job in jobs)
    # The render times the rows always had, each call's counted once (its time over its jobs).
    rendered_s = sum((job.denoise_s or 0.0) / (job.render_batch_size or 1) for job in jobs)
    span_s = max(j.finished_at for j in jobs if j.finished_at) - min(j.started_at for j in jobs if j.started_at)
    print(f"batch {batch_size}: metered {metered_s:.3f} s, device busy {busy_s:.3f} s, rendered {rendered_s:.3f} s, "
          f"wall {span_s.total_seconds():.3f} s")  # fmt: skip
    assert busy_s > 0
    assert metered_s == pytest.approx(busy_s, rel=0.05)
    assert metered_s == pytest.approx(rendered_s, rel=0.05)
    assert metered_s <= span_s.total_seconds()
    if batch_size > 1:
        assert max(job.render_batch_size or 1 for job in jobs) > 1  # some calls did hold several jobs
    assert {(job.steps_run, job.pixel_steps) for job in jobs} == {(8, 96 * 96 * 8)}
    jobs_n, images, gpu_s, lost_s = _rollup(settings, batch_id)
    assert (jobs_n, images, lost_s) == (rows, rows, 0.0) and gpu_s == pytest.approx(metered_s)


@pytest.mark.chaos
def test_a_worker_killed_mid_job_bills_each_job_once(
    system_settings: Settings, settings_env: Callable[[Settings], dict[str, str]], tmp_path: Path
) -> None:
    rows = 20
    settings = system_settings.model_copy(update={"heartbeat_s": 0.2})  # heartbeats that see a render
    with worker_pool(settings, settings_env, tmp_path) as workers:
        first = workers.start()
        batch_id = _submit(workers, _manifest(tmp_path, rows), "killed")
        wait_until(lambda: count_status(settings, batch_id, JobStatus.succeeded) >= 2, what="first results")
        # Kill it while a render has reported its seconds so far (the heartbeat's attempt_gpu_s): frozen
        # first, so that what it had reported is read before the kill (a job can finish in between).
        killed = _frozen_while_reporting(first, settings, batch_id)
        workers.kill(first)
        workers.start()
        wait_for_batch(settings, batch_id, workers=workers)

    jobs = _jobs(settings, batch_id)
    assert {job.status for job in jobs} == {JobStatus.succeeded.value}, workers.log_text()
    rerun = {job.id: job for job in jobs if job.attempts > 1}
    assert set(rerun) == set(killed), "the killed jobs, and only they, ran again"
    for job_id, reported_s in killed.items():  # what the killed attempt reported is shown as lost
        assert rerun[job_id].lost_gpu_s == pytest.approx(reported_s)
    assert any(reported_s > 0 for reported_s in killed.values())
    assert all(job.lost_gpu_s == 0 for job in jobs if job.attempts == 1)
    assert all((job.gpu_s or 0) > 0 and job.attempt_gpu_s == 0 for job in jobs)
    jobs_n, images, gpu_s, lost_s = _rollup(settings, batch_id)
    assert (jobs_n, images) == (rows, rows)  # each job counted once
    assert gpu_s == pytest.approx(sum(job.gpu_s or 0.0 for job in jobs))  # billed: the finishing attempts
    assert lost_s == pytest.approx(sum(job.lost_gpu_s for job in jobs))


def _running(settings: Settings, batch_id: str) -> dict[str, float]:
    """The running jobs of the batch: id -> the seconds their attempt reported so far."""
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            where = (Job.batch_id == batch_id, Job.status == JobStatus.running.value)
            return {job_id: float(s) for job_id, s in session.execute(select(Job.id, Job.attempt_gpu_s).where(*where))}
    finally:
        engine.dispose()


def _frozen_while_reporting(proc: subprocess.Popen[bytes], settings: Settings, batch_id: str) -> dict[str, float]:
    """SIGSTOP the worker (its process group) at a moment one of its renders has reported seconds;
    its running jobs then, with what each reported (nothing changes them until it is killed)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        os.killpg(proc.pid, signal.SIGSTOP)
        time.sleep(0.2)  # a commit the server was still working on is done
        running = _running(settings, batch_id)
        if any(reported_s > 0 for reported_s in running.values()):
            return running
        os.killpg(proc.pid, signal.SIGCONT)
        time.sleep(0.1)
    raise AssertionError("no render of the worker reported its seconds within 120 s")
