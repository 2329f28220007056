"""Fixtures for system tests: the tiny model set, real `ipab worker` processes, waiting on batches."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from shared.db import TERMINAL, Job, make_engine, make_session_factory
from shared.settings import Settings

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def tiny_model_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight model set (plain ViT-bigG-like adapter, safetensors)."""
    from worker.synth import write_tiny_model_set

    folder = tmp_path_factory.mktemp("tiny-models")
    write_tiny_model_set(folder)
    return folder / "model-set.toml"


class Workers:
    """Real `ipab worker` processes started by a test; all killed at teardown."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, **extra_env: str) -> subprocess.Popen[bytes]:
        """Start one more worker process (its own process group, so a kill takes its pool too)."""
        log = (self.logs / f"worker-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "scheduler.cli", "worker", "--loglevel", "INFO"],
            env={**self.env, **extra_env},
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL a worker and its pool children, as the OOM killer would."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.logs.glob("worker-*.log")))


@pytest.fixture
def system_settings(settings: Settings, tiny_model_set: Path) -> Settings:
    """The test's settings, serving the tiny model set."""
    return settings.model_copy(update={"model_set": tiny_model_set})


@pytest.fixture
def workers(
    system_settings: Settings, settings_env: Callable[[Settings], dict[str, str]], tmp_path: Path
) -> Iterator[Workers]:
    """Start real worker processes with `workers.start()`; they are killed at the end."""
    env = {**os.environ, **settings_env(system_settings), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    pool = Workers(env, tmp_path)
    yield pool
    pool.stop_all()


def wait_for_batch(
    settings: Settings, batch_id: str, *, timeout_s: float = 300, workers: Workers | None = None
) -> None:
    """Block until every job of the batch is terminal; fail with the worker logs otherwise."""
    sessions = make_session_factory(make_engine(settings.database_url))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with sessions() as session:
            live = session.scalar(
                select(func.count()).where(Job.batch_id == batch_id, Job.status.not_in([s.value for s in TERMINAL]))
            )
        if live == 0:
            return
        time.sleep(0.5)
    logs = workers.log_text() if workers else ""
    pytest.fail(f"batch {batch_id} did not finish in {timeout_s} s\n{logs}")
