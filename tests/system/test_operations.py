"""Operating a fleet: Prometheus metrics of a real worker and a real API during a real batch,
Celery's own tools against a real worker, JSON log lines, and a graceful SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from scheduler.api.metrics import SCRAPE_CACHE_S
from shared.db import Job, make_engine, make_session_factory
from shared.settings import Settings
from tests.scheduler.api.conftest import make_key, png_bytes
from tests.scheduler.api.served import ServedApi, free_port
from tests.system.conftest import REPO, Workers, scrape, submit, total, wait_for_batch, write_manifest

pytestmark = pytest.mark.slow
JOBS = 6
SMALL = {"steps": 2, "width": 64, "height": 64}


@pytest.fixture
def metrics_port() -> int:
    """The port the API serves its metrics on (IPAB_API_METRICS_PORT), as deploy/kubernetes/api.yaml does."""
    return free_port()


@pytest.fixture
def api(
    system_settings: Settings, settings_env: Callable[[Settings], dict[str, str]], tmp_path: Path, metrics_port: int
) -> Iterator[ServedApi]:
    """A real `ipab api` process on the test's settings, its metrics on `metrics_port`."""
    settings = system_settings.model_copy(update={"api_metrics_port": metrics_port})
    env = {**os.environ, **settings_env(settings), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    server = ServedApi(env, tmp_path / "api.log")
    server.start()
    yield server
    server.stop()


def submit_over_http(api: ServedApi, settings: Settings) -> list[str]:
    key, _ = make_key(settings, "acme")
    client = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    ref = client.post("/v1/references", files={"file": ("a.png", png_bytes(), "image/png")}).json()["id"]
    jobs = [client.post("/v1/jobs", json={"references": [ref], "prompt": f"p{i}", **SMALL}) for i in range(JOBS)]
    assert [r.status_code for r in jobs] == [202] * JOBS, [r.text for r in jobs]
    return [r.json()["id"] for r in jobs]


def test_metrics_move_by_the_jobs_of_a_real_batch_and_celery_sees_the_worker(
    api: ServedApi, metrics_port: int, system_settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    api_metrics = f"http://127.0.0.1:{metrics_port}/metrics"
    assert httpx.get(api.url + "/metrics").status_code == 404  # never on the API's own port without a key
    before = scrape(api_metrics)
    job_ids = submit_over_http(api, system_settings)
    # The API: every POST counted once; the backlog read from SQL at scrape time (once the
    # reading cached by the first scrape is stale).
    time.sleep(SCRAPE_CACHE_S + 0.5)
    queued = scrape(api_metrics)
    posts = total(queued, "ipab_api_requests_total", method="POST", route="/v1/jobs", status="202")
    assert posts - total(before, "ipab_api_requests_total", method="POST", route="/v1/jobs") == JOBS
    assert total(queued, "ipab_jobs_queued", tenant="acme") == JOBS
    assert total(queued, "ipab_jobs_queued_oldest_age_seconds", tenant="acme") > 0
    # A worker serving /metrics, logging JSON, with Celery events on (the default).
    port = free_port()
    workers.start(IPAB_METRICS_PORT=str(port), IPAB_LOG_FORMAT="json")
    worker_url = f"http://127.0.0.1:{port}/metrics"
    scrape(worker_url)  # up once its pool process has loaded the model
    wait_for_jobs(system_settings, job_ids, workers)
    # A new worker's counters start at zero: each moved by exactly the jobs it ran.
    done = scrape(worker_url)
    assert total(done, "ipab_jobs_finished_total", status="succeeded") == JOBS
    assert total(done, "ipab_jobs_finished_total", status="failed") == 0
    for name in ("render", "encode", "upload", "queue_wait"):
        assert total(done, f"ipab_{name}_seconds_count") == JOBS, name
    assert total(done, "ipab_embedding_cache_lookups_total", level="lru") == JOBS  # one reference each
    assert total(done, "ipab_render_batch_size") >= 1
    time.sleep(SCRAPE_CACHE_S + 0.5)
    after = scrape(api_metrics)
    assert total(after, "ipab_jobs_queued", tenant="acme") == 0
    assert_celery_pings_the_worker(workers)
    assert_job_lines_carry_their_fields(workers, job_ids)


def wait_for_jobs(settings: Settings, job_ids: list[str], workers: Workers) -> None:
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session:
        batch_ids = set(session.scalars(select(Job.batch_id).where(Job.id.in_(job_ids))))
    for batch_id in batch_ids:
        wait_for_batch(settings, batch_id, workers=workers)
    with sessions() as session:
        statuses = list(session.scalars(select(Job.status).where(Job.id.in_(job_ids))))
    assert statuses == ["succeeded"] * JOBS, workers.log_text()


def assert_celery_pings_the_worker(workers: Workers) -> None:
    cmd = [sys.executable, "-m", "celery", "-A", "ipab.celery_cli:app", "inspect", "ping", "--timeout", "10"]
    done = subprocess.run(cmd, env=workers.env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "pong" in done.stdout and "ipab-" in done.stdout, done.stdout


def assert_job_lines_carry_their_fields(workers: Workers, job_ids: list[str]) -> None:
    """Every line of the worker is one JSON object; every line naming a job carries its id,
    and the lines logged while the job is in hand carry all of its fields."""
    text = "".join(p.read_text() for p in sorted(workers.logs.glob("worker-*.log")))
    lines = [json.loads(line) for line in text.splitlines() if line.strip()]
    about_jobs = [line for line in lines if any(job_id in line["message"] for job_id in job_ids)]
    assert len(about_jobs) >= 2 * JOBS  # Celery's "received" and "succeeded" at least
    for line in about_jobs:
        assert line.get("job_id") in job_ids and line["job_id"] in line["message"], line
        if line["logger"] != "celery.worker.strategy":  # the consumer, before the runner has the job
            assert {"batch_id", "tenant", "attempt"} <= set(line), line
            assert line["tenant"] == "acme" and line["attempt"] == 1, line


def test_sigterm_finishes_the_job_in_hand_and_gives_back_the_rest(
    system_settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    batch_id = submit(workers, write_manifest(tmp_path, rows=3), "sigterm")
    proc = workers.start()
    sessions = make_session_factory(make_engine(system_settings.database_url))
    wait_until_running(sessions, batch_id, workers)
    os.kill(proc.pid, signal.SIGTERM)  # the main process only, as Kubernetes and docker stop do
    assert proc.wait(timeout=120) == 0, workers.log_text()
    with sessions() as session:
        rows = session.execute(select(Job.status, Job.attempts).where(Job.batch_id == batch_id)).tuples().all()
    assert "running" not in {status for status, _ in rows}, rows
    assert any(status == "succeeded" for status, _ in rows), rows  # the one in hand finished
    workers.start()
    wait_for_batch(system_settings, batch_id, workers=workers)
    with sessions() as session:
        rows = session.execute(select(Job.status, Job.attempts).where(Job.batch_id == batch_id)).tuples().all()
    assert sorted(rows) == [("succeeded", 1)] * 3, rows  # nothing lost, nothing ran twice


def wait_until_running(sessions: object, batch_id: str, workers: Workers) -> None:
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        with sessions() as session:  # type: ignore[operator]
            statuses = set(session.scalars(select(Job.status).where(Job.batch_id == batch_id)))
        if "running" in statuses:
            return
        time.sleep(0.05)
    pytest.fail(f"no job of {batch_id} started\n{workers.log_text()}")
