"""A worker that cannot start takes no job: it exits non-zero with one line, and every
queued job stays queued with its message in Redis for a worker that can run it."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from shared import keys
from shared.db import Job, make_engine, make_session_factory
from shared.model_set import read_model_set
from shared.settings import Settings
from tests.scheduler.submission.conftest import dispatch_all
from tests.system.conftest import Workers, submit, write_manifest

pytestmark = [pytest.mark.slow]
JOBS = 3


def closed_port() -> int:
    """A local TCP port on which nothing listens."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def queued_batch(settings: Settings, workers: Workers, tmp_path: Path) -> str:
    """A batch of JOBS jobs submitted while no worker runs, their messages handed to Redis."""
    batch_id = submit(workers, write_manifest(tmp_path, rows=JOBS), "startup")
    assert dispatch_all(settings, read_model_set(settings.model_set or Path()).name) == JOBS
    return batch_id


def assert_untouched(settings: Settings, batch_id: str) -> None:
    """Every job is still queued, never claimed, and its message is still in Redis."""
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session:
        rows = session.execute(select(Job.status, Job.attempts).where(Job.batch_id == batch_id)).all()
    assert sorted(rows) == [("queued", 0)] * JOBS
    queue = keys.render_queue(read_model_set(settings.model_set or Path()).name)
    assert redis.Redis.from_url(settings.redis_url).llen(queue) == JOBS


def wait_exit(proc: subprocess.Popen[bytes], workers: Workers) -> int:
    try:
        return proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the worker kept running although it cannot start\n{workers.log_text()}")


def test_a_worker_that_cannot_reach_s3_exits_without_taking_a_job(
    system_settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    batch_id = queued_batch(system_settings, workers, tmp_path)
    proc = workers.start(IPAB_S3_ENDPOINT_URL=f"http://127.0.0.1:{closed_port()}", IPAB_TRANSIENT_RETRIES="1")
    assert wait_exit(proc, workers) != 0
    log = workers.log_text()
    assert "ipab: error:" in log and "IPAB_S3_ENDPOINT_URL" in log, log
    assert "ready." not in log
    assert_untouched(system_settings, batch_id)


def test_a_worker_whose_pool_process_cannot_load_the_models_exits_without_taking_a_job(
    system_settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    batch_id = queued_batch(system_settings, workers, tmp_path)
    good = read_model_set(system_settings.model_set or Path())
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    broken = tmp_path / "broken-model-set.toml"
    broken.write_text(
        f'name = "{good.name}"\nbase = "{good.base}"\n'
        f'ip_adapter = "{tmp_path / "broken.safetensors"}"\nimage_encoder = "{good.image_encoder}"\n'
    )
    proc = workers.start(IPAB_MODEL_SET=str(broken))
    assert wait_exit(proc, workers) == 3
    log = workers.log_text()
    assert "the worker process could not start, taking no jobs" in log, log
    assert_untouched(system_settings, batch_id)
