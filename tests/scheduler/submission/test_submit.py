"""`ipab submit`, `status`, `results`, `batches` against real Redis, a real S3 server and SQL."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import redis
from sqlalchemy import select, update
from sqlalchemy.exc import DBAPIError

from scheduler.submission.submit import submit_manifest
from shared.db import Job, JobStatus, ReferenceImage, make_engine, make_session_factory
from shared.errors import InvalidInput, ManifestInvalid
from shared.reconcile import reconcile_once
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.scheduler.submission.conftest import (
    Run,
    count_rows,
    load_jobs,
    queue_length,
    run_ipab,
    write_jsonl,
    write_photos,
)

MODEL_SET = "tiny-test"
PARAMS = {"width": 512, "height": 512, "steps": 4}


@pytest.fixture
def photos(tmp_path: Path) -> dict[str, Path]:
    return write_photos(tmp_path / "photos")


@pytest.fixture
def submit_settings(settings: Settings, tmp_path: Path, database_url: str) -> Settings:
    """The test's settings on SQLite and on PostgreSQL, references allowed from tmp_path."""
    return settings.model_copy(update={"reference_roots": [tmp_path], "database_url": database_url})


@pytest.fixture
def ipab(
    submit_settings: Settings, settings_env: Callable[[Settings], dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Run]:
    def run(*argv: str) -> Run:
        return run_ipab(argv, env=settings_env(submit_settings), monkeypatch=monkeypatch)

    return run


def twelve_rows(photos: dict[str, Path]) -> list[dict[str, Any]]:
    """12 rows over the 3 photos, one with two references, some seeded, two identical unseeded rows."""
    a, c, k = (str(photos[n]) for n in ("astronaut", "coffee", "chelsea"))
    rows: list[dict[str, Any]] = [
        {"reference": ref, "prompt": f"a photo, variant {i}", "seed": i, **PARAMS}
        for i, ref in enumerate([a, c, k, a, c, k, a, c])
    ]
    rows.append({"reference": f"{a}|{k}", "prompt": "both", "seed": 99, **PARAMS})
    rows.append({"reference": c, "prompt": "unseeded twin", **PARAMS})
    rows.append({"reference": c, "prompt": "unseeded twin", **PARAMS})
    rows.append({"reference": k, "prompt": "keyed", "id": "client-1", **PARAMS})
    return rows


def test_submit_inserts_every_row_uploads_each_reference_once_and_enqueues_each_job(
    ipab: Callable[..., Run],
    submit_settings: Settings,
    object_store: ObjectStore,
    photos: dict[str, Path],
    tmp_path: Path,
) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", twelve_rows(photos))

    run = ipab("submit", str(manifest), "--batch", "b1", "--model-set", MODEL_SET)

    assert run.code == 0, run.err
    jobs = load_jobs(submit_settings)
    assert len(jobs) == 12
    assert run.last_line == jobs[0].batch_id
    # Rows wait for the dispatcher, which hands every one of them to Redis.
    assert all(j.status == JobStatus.queued and j.enqueued_at is None and j.attempts == 0 for j in jobs)
    assert {j.lane for j in jobs} == {"bulk"}
    assert len(object_store.list_keys("refs/")) == 3
    assert queue_length(submit_settings, MODEL_SET) == 12
    assert all(j.enqueued_at is not None for j in load_jobs(submit_settings))
    twins = [j for j in jobs if "unseeded twin" in j.spec]
    assert len(twins) == 2 and twins[0].seed != twins[1].seed
    both = json.loads(next(j.spec for j in jobs if '"both"' in j.spec))
    assert [r["key"].split(".")[-1] for r in both["references"]] == ["png", "png"]


def test_resubmitting_the_same_manifest_adds_nothing_and_enqueues_nothing(
    ipab: Callable[..., Run], submit_settings: Settings, photos: dict[str, Path], tmp_path: Path
) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", twelve_rows(photos))
    first = ipab("submit", str(manifest), "--batch", "b1", "--model-set", MODEL_SET)
    seeds = sorted(j.seed for j in load_jobs(submit_settings))

    again = ipab("submit", str(manifest), "--batch", "b1", "--model-set", MODEL_SET)

    assert again.code == 0, again.err
    assert again.last_line == first.last_line
    assert "0 job(s) added, 12 already in the batch" in again.out
    assert sorted(j.seed for j in load_jobs(submit_settings)) == seeds
    assert queue_length(submit_settings, MODEL_SET) == 12


def test_without_batch_name_the_same_file_joins_its_batch_and_an_edited_one_starts_a_new_batch(
    ipab: Callable[..., Run], photos: dict[str, Path], tmp_path: Path
) -> None:
    rows = twelve_rows(photos)
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    first = ipab("submit", str(manifest), "--model-set", MODEL_SET)
    again = ipab("submit", str(manifest), "--model-set", MODEL_SET)
    write_jsonl(manifest, rows[:5])
    edited = ipab("submit", str(manifest), "--model-set", MODEL_SET)

    assert first.last_line == again.last_line != edited.last_line
    assert "5 job(s) added" in edited.out


def test_an_invalid_manifest_exits_2_reports_every_bad_row_and_submits_nothing(
    ipab: Callable[..., Run],
    submit_settings: Settings,
    object_store: ObjectStore,
    photos: dict[str, Path],
    tmp_path: Path,
) -> None:
    rows: list[Any] = twelve_rows(photos)[:3]
    rows.insert(1, {"reference": str(photos["coffee"]), "prompt": "p", "width": 1001, "steps": 0})
    rows.append({"reference": str(tmp_path / "missing.png"), "prompt": "p"})
    rows.append("{not json")
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)

    run = ipab("submit", str(manifest), "--batch", "b1", "--model-set", MODEL_SET)

    assert run.code == 2
    assert "line 2: width: is 1001" in run.err
    assert "line 2: steps: is 0" in run.err
    assert "line 5: reference: is '" in run.err and "does not exist" in run.err
    assert "line 6: json: is not valid JSON" in run.err
    assert "nothing submitted" in run.err
    assert count_rows(submit_settings) == (0, 0)
    assert queue_length(submit_settings, MODEL_SET) == 0
    assert object_store.list_keys("refs/") == []


def test_skip_invalid_submits_only_the_valid_rows_and_reports_the_others(
    ipab: Callable[..., Run], submit_settings: Settings, photos: dict[str, Path], tmp_path: Path
) -> None:
    rows: list[Any] = twelve_rows(photos)[:3]
    rows.insert(1, {"reference": str(photos["coffee"]), "prompt": "p", "seed": -1})
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)

    run = ipab("submit", str(manifest), "--batch", "b1", "--model-set", MODEL_SET, "--skip-invalid")

    assert run.code == 0, run.err
    assert "line 2: seed: is -1" in run.err
    assert "3 job(s) added, 0 already in the batch, 1 invalid row(s) skipped" in run.out
    assert [j.line for j in load_jobs(submit_settings)] == [1, 3, 4]
    assert queue_length(submit_settings, MODEL_SET) == 3


def test_set_gives_defaults_that_row_values_override(
    ipab: Callable[..., Run], submit_settings: Settings, photos: dict[str, Path], tmp_path: Path
) -> None:
    ref = str(photos["coffee"])
    manifest = write_jsonl(
        tmp_path / "m.jsonl", [{"reference": ref, "prompt": "a"}, {"reference": ref, "prompt": "b", "steps": 7}]
    )

    run = ipab("submit", str(manifest), "--model-set", MODEL_SET, "--set", "steps=3", "--set", "width=256")

    assert run.code == 0, run.err
    params = [json.loads(j.spec)["params"] for j in load_jobs(submit_settings)]
    assert [(p["steps"], p["width"]) for p in params] == [(3, 256), (7, 256)]


def test_redis_down_at_submission_leaves_the_jobs_in_sql_for_the_dispatcher(
    submit_settings: Settings, photos: dict[str, Path], tmp_path: Path
) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", twelve_rows(photos)[:4])
    offline = submit_settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"})

    result = submit_manifest(settings=offline, path=manifest, batch_name="b1", model_set_name=MODEL_SET)

    assert (result.added, result.woken) == (4, False)
    assert all(j.status == JobStatus.queued and j.enqueued_at is None for j in load_jobs(offline))
    assert queue_length(submit_settings, MODEL_SET, dispatch=False) == 0
    # Once Redis answers again, the dispatcher finds exactly those jobs in SQL.
    assert queue_length(submit_settings, MODEL_SET) == 4


def test_the_reconciler_hands_back_dispatched_jobs_whose_messages_were_flushed(
    submit_settings: Settings, photos: dict[str, Path], tmp_path: Path
) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", twelve_rows(photos)[:4])
    submit_manifest(settings=submit_settings, path=manifest, batch_name="b1", model_set_name=MODEL_SET)
    assert queue_length(submit_settings, MODEL_SET) == 4
    client = redis.Redis.from_url(submit_settings.redis_url)
    client.flushdb()

    back = submit_settings.model_copy(update={"requeue_grace_s": 0.0})
    sessions = make_session_factory(make_engine(back.database_url))
    report = reconcile_once(sessions=sessions, redis_client=client, settings=back)

    assert sorted(report.reenqueued) == sorted(j.id for j in load_jobs(back))
    assert all(j.enqueued_at is None for j in load_jobs(back))
    assert queue_length(submit_settings, MODEL_SET) == 4
    # A second pass finds every message in place: nothing is doubled.
    assert reconcile_once(sessions=sessions, redis_client=client, settings=back).reenqueued == []
    assert queue_length(submit_settings, MODEL_SET) == 4


def test_an_s3_reference_is_copied_to_its_content_addressed_key(
    submit_settings: Settings, object_store: ObjectStore, photos: dict[str, Path], tmp_path: Path
) -> None:
    object_store.put("incoming/cat.png", photos["chelsea"].read_bytes())
    uri = object_store.uri("incoming/cat.png")
    manifest = write_jsonl(
        tmp_path / "m.jsonl", [{"reference": uri, "prompt": "p"}, {"reference": str(photos["chelsea"]), "prompt": "q"}]
    )

    result = submit_manifest(settings=submit_settings, path=manifest, model_set_name=MODEL_SET)

    assert result.added == 2
    refs = object_store.list_keys("refs/")
    assert len(refs) == 1 and object_store.get(refs[0]) == photos["chelsea"].read_bytes()
    specs = [json.loads(j.spec) for j in load_jobs(submit_settings)]
    assert specs[0]["references"] == specs[1]["references"]
    engine = make_engine(submit_settings.database_url)
    with make_session_factory(engine)() as session:
        image = session.get(ReferenceImage, specs[0]["references"][0]["sha256"])
    engine.dispose()
    assert image is not None and (image.width, image.height, image.ext) == (451, 300, "png")


def test_a_batch_keeps_its_model_set(submit_settings: Settings, photos: dict[str, Path], tmp_path: Path) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", twelve_rows(photos)[:2])
    submit_manifest(settings=submit_settings, path=manifest, batch_name="b1", model_set_name=MODEL_SET)

    with pytest.raises(InvalidInput, match="runs on model set 'tiny-test'"):
        submit_manifest(settings=submit_settings, path=manifest, batch_name="b1", model_set_name="other")


def _finish_some(settings: Settings) -> None:
    engine = make_engine(settings.database_url)
    with make_session_factory(engine).begin() as session:
        ok, bad = session.scalars(select(Job.id).order_by(Job.line).limit(2)).all()
        timings = {"encode_s": 0.5, "denoise_s": 2.0, "upload_s": 0.25}
        output = {"output_key": "outputs/x/y.png", "output_sha256": "ab" * 32, "output_bytes": 10}
        session.execute(
            update(Job).where(Job.id == ok).values(status="succeeded", render_batch_size=4, **output, **timings)
        )
        failure = {"error_type": "InvalidInput", "error_message": "bad"}
        session.execute(update(Job).where(Job.id == bad).values(status="failed", **failure))
    engine.dispose()


def test_status_results_and_batches_report_what_sql_holds(
    ipab: Callable[..., Run],
    submit_settings: Settings,
    object_store: ObjectStore,
    photos: dict[str, Path],
    tmp_path: Path,
) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", twelve_rows(photos))
    batch_id = ipab("submit", str(manifest), "--batch", "b1", "--model-set", MODEL_SET).last_line
    _finish_some(submit_settings)

    status = ipab("status", "b1")
    results = ipab("results", batch_id)
    failed = ipab("results", "b1", "--status", "failed")
    batches = ipab("batches")

    assert status.code == 0 and "succeeded" in status.out
    assert (
        "  succeeded         1" in status.out
        and "  failed            1" in status.out
        and "  queued           10" in status.out
    )
    assert "encode 0.50 s, denoise 2.00 s, upload 0.25 s" in status.out
    records = [json.loads(line) for line in results.out.splitlines()]
    assert len(records) == 12
    done = records[0]
    assert done["output_uri"] == f"s3://{object_store.bucket}/outputs/x/y.png"
    for name in (
        "job_id",
        "status",
        "output_sha256",
        "output_bytes",
        "seed",
        "prompt",
        "negative_prompt",
        "width",
        "height",
        "steps",
        "guidance_scale",
        "ip_adapter_scale",
        "scheduler",
        "references",
        "attempts",
        "worker_host",
        "timings",
        "cache_stats",
        "error",
    ):
        assert name in done
    assert done["timings"]["denoise_s"] == 2.0 and done["timings"]["queued_at"].endswith("Z")
    assert done["render_batch_size"] == 4 and records[1]["render_batch_size"] is None
    assert records[1]["error"] == {"type": "InvalidInput", "message": "bad"}
    assert records[2]["output_uri"] is None and records[2]["error"] is None
    assert records[11]["id"] == "client-1"
    assert [json.loads(line)["status"] for line in failed.out.splitlines()] == ["failed"]
    assert f"b1\t{batch_id}\t{MODEL_SET}" in batches.out and "\t12\t10\t0\t1\t1\t0" in batches.out


def test_status_watch_returns_once_every_job_is_final(
    ipab: Callable[..., Run], submit_settings: Settings, photos: dict[str, Path], tmp_path: Path
) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", twelve_rows(photos)[:3])
    ipab("submit", str(manifest), "--batch", "b1", "--model-set", MODEL_SET)
    engine = make_engine(submit_settings.database_url)
    with make_session_factory(engine).begin() as session:
        session.execute(update(Job).values(status="succeeded"))
    engine.dispose()

    run = ipab("status", "b1", "--watch", "--interval", "0.05")

    assert run.code == 0
    assert "3/3 done" in run.err


def test_submit_watch_waits_for_the_batch_reports_its_end_and_keeps_the_id_last(
    ipab: Callable[..., Run], submit_settings: Settings, photos: dict[str, Path], tmp_path: Path
) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", twelve_rows(photos)[:3])
    engine = make_engine(submit_settings.database_url)
    sessions = make_session_factory(engine)
    ended: list[float] = []

    def fleet() -> None:  # ends the jobs once they are in, a little later: as workers do
        ids: list[str] = []
        while len(ids) < 3:
            time.sleep(0.05)
            try:
                with sessions.begin() as session:
                    ids = sorted(session.scalars(select(Job.id)))
            except DBAPIError:  # no table yet: the submission migrates the database first
                continue
        time.sleep(0.5)
        with sessions.begin() as session:
            session.execute(update(Job).where(Job.id.in_(ids[:2])).values(status=JobStatus.succeeded.value))
            session.execute(update(Job).where(Job.id == ids[2]).values(status=JobStatus.failed.value))
        ended.append(time.monotonic())

    thread = threading.Thread(target=fleet, daemon=True)
    thread.start()
    run = ipab("submit", str(manifest), "--batch", "b1", "--model-set", MODEL_SET, "--watch", "--interval", "0.05")
    returned = time.monotonic()
    thread.join(timeout=10)
    engine.dispose()

    assert ended and returned >= ended[0]  # it waited for the last job
    assert run.code == 1  # a job failed, as `ipab status --watch` says it
    lines = run.out.splitlines()
    assert lines[0].startswith("batch b1: 3 job(s) added") and "done: 2 succeeded, 1 failed" in lines
    assert len(run.last_line) == 36 and lines.count(run.last_line) == 1  # the id, once, last: scripts read it
    assert "3/3 done" in run.err


def test_an_unknown_batch_is_refused_by_name(ipab: Callable[..., Run]) -> None:
    run = ipab("status", "nope")

    assert run.code == 2 and "BATCH" in run.err and "'nope'" in run.err


def test_manifest_invalid_carries_every_problem(submit_settings: Settings, tmp_path: Path) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "p"}, {"reference": "x.png", "prompt": 3}])

    with pytest.raises(ManifestInvalid) as info:
        submit_manifest(settings=submit_settings, path=manifest, model_set_name=MODEL_SET)

    assert [(line, field) for line, field, _ in info.value.problems] == [
        (1, "reference"),
        (2, "prompt"),
        (2, "reference"),
    ]
