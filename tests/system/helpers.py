"""Helpers for system tests: real `ipab worker` processes and waiting on a batch."""

from __future__ import annotations

import contextlib
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
            [sys.executable, "-m", "ipab.cli", "worker", "--loglevel", "INFO"],
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


@contextlib.contextmanager
def worker_pool(
    settings: Settings, settings_env: Callable[[Settings], dict[str, str]], logs: Path
) -> Iterator[Workers]:
    """Real `ipab worker` processes for these settings (start them with `.start()`); killed on exit."""
    env = {**os.environ, **settings_env(settings), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    pool = Workers(env, logs)
    try:
        yield pool
    finally:
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
        if workers and workers.procs and all(p.poll() is not None for p in workers.procs):
            pytest.fail(f"every worker exited while batch {batch_id} was unfinished\n{workers.log_text()}")
        time.sleep(0.5)
    logs = workers.log_text() if workers else ""
    pytest.fail(f"batch {batch_id} did not finish in {timeout_s} s\n{logs}")
