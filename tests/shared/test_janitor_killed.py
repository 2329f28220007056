"""`ipab janitor` SIGKILLed in the middle of its work: every object gone has a record saying so
(`removing` or `removed`), every job still marked kept has its object, and the next run finishes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable

import pytest
from sqlalchemy import func, select

from shared import keys
from shared.db import Job
from shared.retention import DataState
from shared.settings import Settings
from tests.shared.conftest import World

pytestmark = [pytest.mark.chaos, pytest.mark.slow]
JOBS = 1200
STEP = 40  # jobs per janitor step: many steps, so the kill lands inside the work


@pytest.fixture
def world(world: World) -> World:
    """The janitor's world (conftest.py's, on SQLite and PostgreSQL), with small steps."""
    world.settings = world.settings.model_copy(update={"janitor_batch": STEP})
    return world


def _states(world: World) -> dict[str | None, int]:
    with world.sessions() as session:
        rows = session.execute(select(Job.data_state, func.count()).group_by(Job.data_state)).all()
    return {state: count for state, count in rows}


def _kill_when_some_are_removed(proc: subprocess.Popen[bytes], world: World) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if _states(world).get(DataState.removed.value, 0) >= 3 * STEP:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            return
        time.sleep(0.02)
    raise AssertionError(f"the janitor did not get going (exit {proc.poll()}): {_states(world)}")


def test_a_janitor_killed_midway_loses_track_of_no_object_and_the_next_one_finishes(
    world: World, settings_env: Callable[[Settings], dict[str, str]]
) -> None:
    batch_id, jobs = world.batch("big", jobs=JOBS)
    world.expire(jobs)
    env = {**os.environ, **settings_env(world.settings)}

    proc = subprocess.Popen([sys.executable, "-m", "ipab.cli", "janitor"], env=env, stderr=subprocess.PIPE)
    _kill_when_some_are_removed(proc, world)

    states = _states(world)
    assert states.get(None, 0) > 0, f"the kill came too late to test anything: {states}"
    present = set(world.keys_under(keys.outputs_prefix(batch_id)))
    with world.sessions() as session:
        for job_id, state in session.execute(select(Job.id, Job.data_state)):
            key = keys.output_key(batch_id, job_id, 1)
            if state is None:
                assert key in present, f"job {job_id} is marked kept, but its object is gone"
            elif state == DataState.removed.value:
                assert key not in present, f"job {job_id} is marked removed, but its object is there"

    done = subprocess.run([sys.executable, "-m", "ipab.cli", "janitor"], env=env, capture_output=True, text=True)

    assert done.returncode == 0, done.stderr
    assert _states(world) == {DataState.removed.value: JOBS}
    assert world.keys_under(keys.outputs_prefix(batch_id)) == []
