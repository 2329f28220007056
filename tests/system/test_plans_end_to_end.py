"""End to end: a plan due now -> a real `ipab beat` -> a real `ipab worker` -> images in S3."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

from sqlalchemy import select

from shared.db import Job, JobStatus, utcnow
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.scheduler.plans.conftest import Clock, apply, plan_context, slots, write_manifest, write_plan
from tests.system.conftest import REPO, Workers, wait_for_batch


def test_a_plan_due_now_renders_its_batch_through_a_real_worker(
    system_settings: Settings, workers: Workers, tmp_path: Path
) -> None:
    write_manifest(tmp_path, rows=2)
    # Applied two minutes ago, every minute: the current minute's slot is due now.
    with plan_context(system_settings, Clock(utcnow() - timedelta(minutes=2))) as ctx:
        fields = {"name": "every-minute", "schedule": "* * * * *", "manifest": "rows.jsonl"}
        apply(ctx, write_plan(tmp_path, **fields, set={"width": 64, "height": 64, "steps": 2}))
        beat = subprocess.run(
            [sys.executable, "-m", "ipab.cli", "beat", "--passes", "1"],
            env=workers.env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert beat.returncode == 0, beat.stderr
        (slot,) = slots(ctx.sessions, "every-minute")
        assert slot.status == "submitted" and slot.batch_id is not None, slot.reason
        workers.start()
        wait_for_batch(system_settings, slot.batch_id, workers=workers)
        with ctx.sessions() as session:
            jobs = list(session.scalars(select(Job).where(Job.batch_id == slot.batch_id)))

    assert [j.status for j in jobs] == [JobStatus.succeeded.value] * 2, workers.log_text()
    store = ObjectStore.from_settings(system_settings)
    for job in jobs:
        assert hashlib.sha256(store.get(job.output_key or "")).hexdigest() == job.output_sha256
