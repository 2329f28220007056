"""A tenant at its concurrency cap, or with its GPU-seconds quota spent, is held back by the
dispatcher; every other tenant proceeds."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Final

import redis
from PIL import Image
from sqlalchemy import select, update

from scheduler.submission.submit import submit_manifest
from scheduler.usage.quotas import set_quotas
from shared.db import Batch, Job, JobStatus, UsageRollup, ensure_database, make_engine, make_session_factory, utcnow
from shared.dispatch.policy import Policy
from shared.jobs import transaction
from shared.keys import render_queue
from shared.settings import Settings
from shared.wire import decode_render_envelope
from tests.scheduler.submission.conftest import dispatch_all

MODEL_SET: Final = "tiny-holds"


def _submit(settings: Settings, folder: Path, tenant: str, rows: int) -> str:
    Image.new("RGB", (16, 16), (1, 2, 3)).save(folder / "ref.png")
    lines = [{"reference": "ref.png", "prompt": f"{tenant} {i}", "seed": i} for i in range(rows)]
    manifest = folder / f"{tenant}.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return submit_manifest(
        settings=settings, path=manifest, batch_name=tenant, model_set_name=MODEL_SET, tenant=tenant
    ).batch_id


def _dispatched_per_tenant(settings: Settings) -> Counter[str]:
    client = redis.Redis.from_url(settings.redis_url)
    ids = [decode_render_envelope(item).batch_id for item in client.lrange(render_queue(MODEL_SET), 0, -1)]
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session:
        tenants = dict(session.execute(select(Batch.id, Batch.tenant)).tuples().all())
    return Counter(tenants[batch_id] for batch_id in ids)


def test_the_policy_skips_a_tenant_at_its_cap_in_every_lane() -> None:
    counts = {("interactive", "a"): 10, ("bulk", "a"): 10, ("bulk", "b"): 10}
    starts = Policy().order(counts, 100, caps={"a": 3})
    assert Counter(tenant for _, tenant in starts) == {"a": 3, "b": 10}
    assert Policy().order(counts, 100, caps={"a": 0, "b": 0}) == []


def test_a_tenant_at_its_concurrency_cap_waits_and_the_others_proceed(settings: Settings, tmp_path: Path) -> None:
    settings = settings.model_copy(update={"reference_roots": [tmp_path]})
    ensure_database(settings.database_url)
    sessions = make_session_factory(make_engine(settings.database_url))
    with transaction(sessions) as session:
        set_quotas(session=session, tenant="capped", changes={"max_running": 2})
    capped = _submit(settings, tmp_path, "capped", 10)
    _submit(settings, tmp_path, "free", 10)

    dispatch_all(settings, MODEL_SET)
    assert _dispatched_per_tenant(settings) == {"capped": 2, "free": 10}

    # One of the capped tenant's jobs ends: one more of its jobs may start.
    with transaction(sessions) as session:
        job_id = session.scalar(select(Job.id).where(Job.batch_id == capped, Job.enqueued_at.is_not(None)).limit(1))
        session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.succeeded.value))
    dispatch_all(settings, MODEL_SET)
    assert _dispatched_per_tenant(settings) == {"capped": 3, "free": 10}


def test_a_tenant_whose_gpu_seconds_are_spent_starts_nothing(settings: Settings, tmp_path: Path) -> None:
    settings = settings.model_copy(update={"reference_roots": [tmp_path]})
    ensure_database(settings.database_url)
    sessions = make_session_factory(make_engine(settings.database_url))
    _submit(settings, tmp_path, "spender", 5)
    _submit(settings, tmp_path, "saver", 5)
    with transaction(sessions) as session:  # the quota is set after the jobs were queued
        set_quotas(session=session, tenant="spender", changes={"gpu_s_per_month": 60.0})
        session.add(
            UsageRollup(
                tenant="spender", day=utcnow().date(), batch_id="earlier", lane="bulk", model_set=MODEL_SET,
                jobs=9, images=9, gpu_s=61.0, lost_gpu_s=0.0, pixel_steps=0, queue_s=0.0, total_s=0.0,
            )
        )  # fmt: skip
    dispatch_all(settings, MODEL_SET)
    assert _dispatched_per_tenant(settings) == {"saver": 5}
