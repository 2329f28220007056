"""Quotas turn usage into limits: a submission that would pass one is refused as a whole, with the
limit, what is used and when it resets; concurrent submissions never pass it (SQLite, PostgreSQL)."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta
from pathlib import Path
from typing import Final

import pytest
from PIL import Image
from sqlalchemy import func, select, update

from scheduler.submission.submit import SubmitResult, submit_manifest
from scheduler.usage.quotas import check_limit, quota_status, refusals, room, set_quotas
from shared.db import Batch, Job, JobStatus, QuotaRefusal, UsageRollup, make_engine, make_session_factory, utcnow
from shared.errors import InvalidInput, QuotaExceeded
from shared.jobs import transaction
from shared.settings import Settings

MODEL_SET: Final = "tiny-quota"
TENANT: Final = "acme"


@pytest.fixture
def quota_settings(settings: Settings, database_url: str, tmp_path: Path) -> Settings:
    """The test's Redis and S3, on SQLite and PostgreSQL, reading references from tmp_path."""
    Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / "ref.png")
    return settings.model_copy(update={"database_url": database_url, "reference_roots": [tmp_path]})


def _sessions(settings: Settings):  # type: ignore[no-untyped-def]
    return make_session_factory(make_engine(settings.database_url))


def set_limits(settings: Settings, tenant: str = TENANT, **limits: float | None) -> None:
    from shared.db import ensure_database

    ensure_database(settings.database_url)
    with transaction(_sessions(settings)) as session:
        set_quotas(session=session, tenant=tenant, changes=limits)


def submit(settings: Settings, folder: Path, name: str, rows: int, tenant: str = TENANT) -> SubmitResult:
    lines = [{"reference": "ref.png", "prompt": f"{name} {i}", "seed": i} for i in range(rows)]
    manifest = folder / f"{name}.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return submit_manifest(settings=settings, path=manifest, batch_name=name, model_set_name=MODEL_SET, tenant=tenant)


def jobs_of(settings: Settings, tenant: str = TENANT) -> int:
    with _sessions(settings)() as session:
        stmt = select(func.count()).select_from(Job).join(Batch, Batch.id == Job.batch_id).where(Batch.tenant == tenant)
        return int(session.scalar(stmt) or 0)


def test_a_submission_over_the_images_quota_is_refused_as_a_whole(quota_settings: Settings, tmp_path: Path) -> None:
    set_limits(quota_settings, images_per_day=5)
    assert submit(quota_settings, tmp_path, "first", 3).added == 3

    with pytest.raises(QuotaExceeded) as refused:
        submit(quota_settings, tmp_path, "second", 3)

    e = refused.value
    assert (e.tenant, e.quota, e.limit, e.used, e.requested) == (TENANT, "images_per_day", 5, 3, 3)
    tomorrow = (utcnow() + timedelta(days=1)).date()
    assert e.resets_at == datetime.combine(tomorrow, datetime.min.time())
    assert "images_per_day = 5 images: 3 used, 3 more asked; it resets at" in str(e)
    assert jobs_of(quota_settings) == 3  # nothing of the refused submission was written
    assert submit(quota_settings, tmp_path, "third", 2).added == 2  # what fits still goes in
    with transaction(_sessions(quota_settings)) as session:
        assert refusals(session=session) == [(TENANT, "images_per_day", 1)]


def test_images_made_and_jobs_still_live_count_and_a_canceled_job_gives_its_image_back(
    quota_settings: Settings, tmp_path: Path
) -> None:
    set_limits(quota_settings, images_per_month=4)
    batch_id = submit(quota_settings, tmp_path, "live", 2).batch_id
    sessions = _sessions(quota_settings)
    with transaction(sessions) as session:  # two images made this month already
        session.add(
            UsageRollup(
                tenant=TENANT, day=utcnow().date(), batch_id="old", lane="bulk", model_set=MODEL_SET,
                jobs=2, images=2, gpu_s=1.0, lost_gpu_s=0.0, pixel_steps=0, queue_s=0.0, total_s=0.0,
            )
        )  # fmt: skip
        assert room(session=session, tenant=TENANT) == 0
    with pytest.raises(QuotaExceeded):
        submit(quota_settings, tmp_path, "more", 1)
    with transaction(sessions) as session:  # one of the live jobs is canceled: its image is not coming
        job_id = session.scalar(select(Job.id).where(Job.batch_id == batch_id).limit(1))
        session.execute(update(Job).where(Job.id == job_id).values(status=JobStatus.canceled.value))
    assert submit(quota_settings, tmp_path, "more", 1).added == 1


def test_a_spent_gpu_seconds_quota_refuses_new_jobs(quota_settings: Settings, tmp_path: Path) -> None:
    set_limits(quota_settings, gpu_s_per_day=10.0)
    assert submit(quota_settings, tmp_path, "before", 1).added == 1
    with transaction(_sessions(quota_settings)) as session:
        session.add(
            UsageRollup(
                tenant=TENANT, day=utcnow().date(), batch_id="b", lane="bulk", model_set=MODEL_SET,
                jobs=5, images=5, gpu_s=10.0, lost_gpu_s=3.0, pixel_steps=0, queue_s=0.0, total_s=0.0,
            )
        )  # fmt: skip
    with pytest.raises(QuotaExceeded) as refused:
        submit(quota_settings, tmp_path, "after", 1)
    assert (refused.value.quota, refused.value.used) == ("gpu_s_per_day", 10.0)  # lost seconds are not billed
    # Another tenant is not held by acme's quota.
    assert submit(quota_settings, tmp_path, "other", 1, tenant="globex").added == 1


@pytest.mark.slow
def test_concurrent_submissions_never_pass_the_quota(quota_settings: Settings, tmp_path: Path) -> None:
    """24 submissions of one job each, at once, each from its own engine (as separate processes):
    exactly the quota's 10 go in, 14 are refused, whatever the interleaving."""
    limit, tries = 10, 24
    set_limits(quota_settings, images_per_day=limit)
    outcomes: list[str] = [""] * tries
    gate = threading.Barrier(tries)

    def one(i: int) -> None:
        lines = json.dumps({"reference": "ref.png", "prompt": f"job {i}", "seed": i}) + "\n"
        manifest = tmp_path / f"m{i}.jsonl"
        manifest.write_text(lines)
        gate.wait()
        try:
            result = submit_manifest(
                settings=quota_settings, path=manifest, batch_name=f"b{i}", model_set_name=MODEL_SET, tenant=TENANT
            )
            outcomes[i] = f"added {result.added}"
        except QuotaExceeded:
            outcomes[i] = "refused"
        except Exception as e:
            outcomes[i] = repr(e)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(tries)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(outcomes) == ["added 1"] * limit + ["refused"] * (tries - limit), outcomes
    assert jobs_of(quota_settings) == limit
    with _sessions(quota_settings)() as session:
        assert session.scalar(select(QuotaRefusal.refusals)) == tries - limit


def test_quota_status_shows_each_limit_with_what_is_used_and_when_it_resets(
    quota_settings: Settings, tmp_path: Path
) -> None:
    set_limits(quota_settings, images_per_day=100, max_running=2)
    submit(quota_settings, tmp_path, "some", 3)
    with transaction(_sessions(quota_settings)) as session:
        status = quota_status(session=session)[TENANT]
    assert status["images_per_day"]["limit"] == 100 and status["images_per_day"]["used"] == 3
    assert status["images_per_day"]["resets_at"].endswith("T00:00:00Z")
    assert status["gpu_s_per_month"]["limit"] is None
    assert status["max_running"] == {"limit": 2, "used": 0, "resets_at": None}


def test_a_limit_is_a_number_of_zero_or_more() -> None:
    assert check_limit("images_per_day", 3) == 3
    assert check_limit("gpu_s_per_month", 2) == 2.0
    assert check_limit("max_running", None) is None
    for name, bad in [("images_per_day", -1), ("images_per_day", 1.5), ("gpu_s_per_day", "x"), ("nope", 1)]:
        with pytest.raises(InvalidInput):
            check_limit(name, bad)
