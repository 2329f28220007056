"""Queue position and ETA follow the lane policy, not the order rows were inserted in."""

from __future__ import annotations

from pathlib import Path

from sqlalchemy import select

from scheduler.submission.submit import submit_manifest
from shared.db import Job, make_engine, make_session_factory, utcnow
from shared.dispatch.position import forecast_batch, forecast_job
from shared.settings import Settings
from tests.scheduler.submission.conftest import queue_length, write_jsonl

MODEL_SET = "tiny-position"


def _submit(settings: Settings, folder: Path, name: str, rows: int, **options: str) -> str:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (16, 16), (1, 2, 3)).save(folder / "ref.png")
    lines = [{"reference": "ref.png", "prompt": f"{name} {i}", "seed": i} for i in range(rows)]
    manifest = write_jsonl(folder / f"{name}.jsonl", lines)
    return submit_manifest(
        settings=settings,
        path=manifest,
        batch_name=name,
        model_set_name=MODEL_SET,
        **options,  # type: ignore[arg-type]
    ).batch_id


def test_an_interactive_job_submitted_last_is_first_in_line(settings: Settings, tmp_path: Path) -> None:
    settings = settings.model_copy(update={"reference_roots": [tmp_path]})
    bulk = _submit(settings, tmp_path, "bulk", 50)
    urgent = _submit(settings, tmp_path, "urgent", 1, lane="interactive")
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session:
        urgent_job = session.scalar(select(Job.id).where(Job.batch_id == urgent))
        last_bulk = session.scalar(select(Job.id).where(Job.batch_id == bulk).order_by(Job.line.desc()))
    assert urgent_job and last_bulk

    job = forecast_job(sessions=sessions, settings=settings, job_id=urgent_job, dispatched=3, now=utcnow())
    assert job is not None and job.position == 3  # only what is already in Redis is ahead of it
    tail = forecast_job(sessions=sessions, settings=settings, job_id=last_bulk, dispatched=3, now=utcnow())
    assert tail is not None and tail.position == 3 + 1 + 49  # the urgent job, then 49 bulk jobs
    batch = forecast_batch(sessions=sessions, settings=settings, batch_id=bulk, dispatched=3, now=utcnow())
    assert batch is not None and batch.position == tail.position and batch.eta_s is None  # nothing finished yet


def test_two_tenants_share_a_lane_so_the_small_tenants_batch_ends_early(settings: Settings, tmp_path: Path) -> None:
    settings = settings.model_copy(update={"reference_roots": [tmp_path]})
    _submit(settings, tmp_path, "big", 100, tenant="a")
    small = _submit(settings, tmp_path, "small", 5, tenant="b")
    sessions = make_session_factory(make_engine(settings.database_url))
    forecast = forecast_batch(sessions=sessions, settings=settings, batch_id=small, dispatched=0, now=utcnow())
    # Alternating with tenant a: its 5th job starts after 4 of its own and 4 or 5 of a's.
    assert forecast is not None and 8 <= forecast.position <= 10
    # And the forecast comes true: the dispatcher hands them over in that order.
    assert queue_length(settings, MODEL_SET) == 105


def test_a_deep_round_hands_every_job_to_redis_exactly_once(settings: Settings, tmp_path: Path) -> None:
    import redis

    from tests.scheduler.submission.conftest import dispatch_all

    settings = settings.model_copy(update={"reference_roots": [tmp_path]})
    _submit(settings, tmp_path, "many", 700)  # more than a fetch (256) per round
    assert dispatch_all(settings, MODEL_SET) == 700
    client = redis.Redis.from_url(settings.redis_url)
    items = client.lrange(f"ipab.render.{MODEL_SET}", 0, -1)
    from shared.wire import decode_render_envelope

    ids = [decode_render_envelope(item).job_id for item in items]
    assert len(ids) == 700 and len(set(ids)) == 700
