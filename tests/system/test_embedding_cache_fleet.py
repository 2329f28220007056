"""The embedding cache across a fleet: each reference image encoded once by real workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from devkit.demo import write_reference_photos
from shared.db import Job, JobStatus, make_engine, make_session_factory
from shared.settings import Settings
from tests.system.conftest import Workers, ipab, wait_for_batch

pytestmark = pytest.mark.slow
JOBS = 200
FAST = ["--set", "width=64", "--set", "height=64", "--set", "steps=2", "--set", "guidance_scale=0"]


def write_five_reference_manifest(folder: Path, name: str) -> Path:
    """200 rows over 5 distinct images (the 3 photos, and two of them mirrored)."""
    from PIL import Image, ImageOps

    photos = write_reference_photos(folder / "refs")
    for i, photo in enumerate(photos[:2]):
        ImageOps.mirror(Image.open(photo)).save(folder / "refs" / f"mirrored-{i}.png")
    refs = [*photos, folder / "refs" / "mirrored-0.png", folder / "refs" / "mirrored-1.png"]
    rows = [{"reference": str(refs[i % 5]), "prompt": f"p{i}", "seed": i} for i in range(JOBS)]
    path = folder / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def cache_totals(settings: Settings, batch_id: str) -> dict[str, int]:
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session:
        jobs = session.scalars(select(Job).where(Job.batch_id == batch_id)).all()
    assert [j.status for j in jobs] == [JobStatus.succeeded.value] * JOBS
    totals: dict[str, int] = {}
    for job in jobs:
        for name, value in json.loads(job.cache_stats or "{}").items():
            totals[name] = totals.get(name, 0) + int(value)
    return totals


def test_200_jobs_over_5_images_on_2_workers_encode_each_image_once(
    system_settings: Settings, workers: Workers, tmp_path: Path
) -> None:

    def run_batch(name: str) -> dict[str, int]:
        manifest = write_five_reference_manifest(tmp_path, f"{name}.jsonl")
        done = ipab(workers.env, "submit", str(manifest), "--batch", name, *FAST, cwd=tmp_path)
        batch_id = done.stdout.strip().splitlines()[-1]
        wait_for_batch(system_settings, batch_id, workers=workers)
        return cache_totals(system_settings, batch_id)

    for _ in range(2):
        workers.start()
    assert run_batch("first")["encodes"] == 5

    # Redis flushed, workers restarted (empty in-process caches): one download per image, no encode.
    workers.stop_all()
    redis.Redis.from_url(system_settings.redis_url).flushdb()
    for _ in range(2):
        workers.start()
    totals = run_batch("second")
    assert (totals["encodes"], totals["store_hits"]) == (0, 5)
    stats = ipab(workers.env, "cache", "stats", "--json", cwd=tmp_path)
    assert json.loads(stats.stdout)["encodes"] == 0  # fleet counters since the flush
