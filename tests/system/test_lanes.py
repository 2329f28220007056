"""Lanes, fair share and pause with real workers: the start order a user sees, and no loss when the dispatcher dies."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import select

from shared.db import Batch, Job, JobStatus, make_engine, make_session_factory
from shared.settings import Settings
from tests.system.conftest import REPO, Workers, wait_for_batch, worker_pool

SIZE = {"width": 64, "height": 64, "steps": 2}


@pytest.fixture
def lane_settings(system_settings: Settings) -> Settings:
    # One message in Redis at a time, however fast the workers take them (no horizon): the order
    # of starts is the dispatcher's order.
    return system_settings.model_copy(update={"dispatch_depth": 1, "dispatch_horizon_s": 0.0, "dispatch_lock_s": 2.0})


@pytest.fixture
def lane_workers(
    lane_settings: Settings, settings_env: Callable[[Settings], dict[str, str]], tmp_path: Path
) -> Iterator[Workers]:
    with worker_pool(lane_settings, settings_env, tmp_path) as pool:
        yield pool


def manifest(folder: Path, name: str, rows: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (32, 32), (10, 120, 200)).save(folder / "ref.png")
    path = folder / f"{name}.jsonl"
    lines = [{"reference": "ref.png", "prompt": f"{name} {i}", "seed": i, **SIZE} for i in range(rows)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def ipab(workers: Workers, *args: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "ipab.cli", *args], env=workers.env, cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def jobs_by_start(settings: Settings) -> list[tuple[str, str, object]]:
    """(batch name, status, started_at) of every job that started, in start order."""
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session:
        rows = session.execute(
            select(Batch.name, Job.status, Job.started_at)
            .join(Batch, Batch.id == Job.batch_id)
            .where(Job.started_at.is_not(None))
            .order_by(Job.started_at)
        ).all()
    return [(r[0], r[1], r[2]) for r in rows]


def wait_for_starts(settings: Settings, count: int, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while len(jobs_by_start(settings)) < count:
        assert time.monotonic() < deadline, f"fewer than {count} jobs started in {timeout_s} s"
        time.sleep(0.2)


def test_an_interactive_job_behind_a_bulk_backlog_starts_next(
    lane_settings: Settings, lane_workers: Workers, tmp_path: Path
) -> None:
    # Jobs of a few tens of ms: a backlog that outlasts `ipab submit`'s start-up on a quiet machine.
    bulk = ipab(lane_workers, "submit", str(manifest(tmp_path, "bulk", 200)), "--batch", "bulk", cwd=tmp_path)
    lane_workers.start()
    wait_for_starts(lane_settings, 3)
    urgent_rows = manifest(tmp_path, "urgent", 1)
    urgent = ipab(lane_workers, "submit", str(urgent_rows), "--batch", "urgent", "--lane", "interactive", cwd=tmp_path)
    wait_for_batch(lane_settings, urgent, workers=lane_workers, timeout_s=120)
    sessions = make_session_factory(make_engine(lane_settings.database_url))
    with sessions() as session:
        queued_at, started_at = session.execute(
            select(Job.queued_at, Job.started_at).where(Job.batch_id == urgent)
        ).one()
    between = [name for name, _, at in jobs_by_start(lane_settings) if queued_at < at < started_at]  # type: ignore[operator]
    # Ahead of it: at most the one message already in Redis when it arrived (and a start racing it).
    assert len(between) <= 2, between
    # The backlog was still waiting when it started: it went ahead of bulk jobs, not after them all.
    assert [name for name, _, at in jobs_by_start(lane_settings) if name == "bulk" and at > started_at]  # type: ignore[operator]
    ipab(lane_workers, "cancel", bulk, cwd=tmp_path)


def test_two_tenants_in_one_lane_interleave(lane_settings: Settings, lane_workers: Workers, tmp_path: Path) -> None:
    big = ipab(
        lane_workers, "submit", str(manifest(tmp_path, "big", 40)), "--batch", "big", "--tenant", "a", cwd=tmp_path
    )
    small = ipab(
        lane_workers, "submit", str(manifest(tmp_path, "small", 6)), "--batch", "small", "--tenant", "b", cwd=tmp_path
    )
    lane_workers.start()
    wait_for_batch(lane_settings, small, workers=lane_workers, timeout_s=180)
    order = [name for name, _, _ in jobs_by_start(lane_settings)]
    # Fair share: tenant b's six jobs alternate with tenant a's instead of waiting for all 40.
    last_small = max(i for i, name in enumerate(order) if name == "small")
    assert last_small <= 13, order
    assert order[:12].count("small") >= 5, order
    ipab(lane_workers, "cancel", big, cwd=tmp_path)


def test_a_paused_batch_starts_nothing_until_resumed(
    lane_settings: Settings, lane_workers: Workers, tmp_path: Path
) -> None:
    paused = ipab(lane_workers, "submit", str(manifest(tmp_path, "later", 5)), "--batch", "later", cwd=tmp_path)
    assert (
        "paused batch later: 5 queued"
        in subprocess.run(
            [sys.executable, "-m", "ipab.cli", "pause", "later"],
            env=lane_workers.env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    )
    other = ipab(lane_workers, "submit", str(manifest(tmp_path, "now", 3)), "--batch", "now", cwd=tmp_path)
    lane_workers.start()
    wait_for_batch(lane_settings, other, workers=lane_workers, timeout_s=120)
    time.sleep(3)  # the worker is idle now, and still takes nothing of the paused batch
    assert [name for name, _, _ in jobs_by_start(lane_settings)] == ["now"] * 3

    ipab(lane_workers, "resume", "later", cwd=tmp_path)
    wait_for_batch(lane_settings, paused, workers=lane_workers, timeout_s=120)
    statuses = [status for name, status, _ in jobs_by_start(lane_settings) if name == "later"]
    assert statuses == [JobStatus.succeeded.value] * 5


def test_a_dispatcher_killed_mid_run_loses_nothing_and_another_takes_over(
    lane_settings: Settings, lane_workers: Workers, tmp_path: Path
) -> None:
    batch = ipab(lane_workers, "submit", str(manifest(tmp_path, "steady", 16)), "--batch", "steady", cwd=tmp_path)
    # Dedicated control loops (no dispatcher in the worker): two replicas, the first killed mid-run.
    env = {**lane_workers.env, "IPAB_RECONCILE_IN_WORKERS": "false"}
    lane_workers.env.update(env)
    loops = [_control_loop(env, tmp_path / "loop-0.log")]
    time.sleep(3)  # the first replica takes the dispatch lock
    loops.append(_control_loop(env, tmp_path / "loop-1.log"))
    lane_workers.start()
    try:
        wait_for_starts(lane_settings, 4)
        os.killpg(loops[0].pid, signal.SIGKILL)
        wait_for_batch(lane_settings, batch, workers=lane_workers, timeout_s=240)
    finally:
        for loop in loops:
            if loop.poll() is None:
                os.killpg(loop.pid, signal.SIGKILL)
            loop.wait()
    rows = jobs_by_start(lane_settings)
    assert [status for _, status, _ in rows] == [JobStatus.succeeded.value] * 16


def _control_loop(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "ipab.cli", "reconcile", "--loop"],
        env=env,
        cwd=REPO,
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
