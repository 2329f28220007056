"""A retry puts failed jobs back in the queue, and a failed job gave its image back to its tenant's
quota: queued again, each counts again. So a retry that would pass a quota is refused as a whole,
with the submissions' QuotaExceeded (API 429 quota-exceeded, CLI exit 2 in one line), and nothing
is re-queued; concurrent retries never pass it together (SQLite, PostgreSQL)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Final

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import Engine, select, update
from sqlalchemy.orm import Session, sessionmaker

from scheduler.api.app import create_app
from scheduler.batches.actions import retry_failed
from scheduler.submission.submit import submit_manifest
from scheduler.usage.quotas import check_quotas, refusals, set_quotas
from shared.db import Job, JobStatus, UsageRollup, ensure_database, make_engine, make_session_factory, utcnow
from shared.errors import QuotaExceeded
from shared.jobs import transaction
from shared.settings import Settings
from tests.scheduler.api.conftest import assert_problem, make_key
from tests.scheduler.submission.conftest import Run, run_ipab

TENANT: Final = "alice"
MODEL_SET: Final = "tiny"


@pytest.fixture
def quota_settings(api_settings: Settings, database_url: str, tmp_path: Path) -> Settings:
    """The API's test settings on SQLite and PostgreSQL, reading references from tmp_path."""
    Image.new("RGB", (16, 16), (10, 20, 30)).save(tmp_path / "ref.png")
    ensure_database(database_url)
    return api_settings.model_copy(update={"database_url": database_url, "reference_roots": [tmp_path]})


Sessions = sessionmaker[Session]


@pytest.fixture
def sessions_of(quota_settings: Settings) -> Iterator[Callable[[], Sessions]]:
    """A factory of session factories, each on its own engine (as separate processes); disposed at the end."""
    engines: list[Engine] = []

    def make() -> Sessions:
        engines.append(make_engine(quota_settings.database_url))
        return make_session_factory(engines[-1])

    yield make
    for engine in engines:
        engine.dispose()


def _limit(sessions: Sessions, **limits: float) -> None:
    with transaction(sessions) as session:
        set_quotas(session=session, tenant=TENANT, changes=limits)


def _submit(settings: Settings, folder: Path, name: str, rows: int) -> str:
    lines = [{"reference": "ref.png", "prompt": f"{name} {i}", "seed": i} for i in range(rows)]
    manifest = folder / f"{name}.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    result = submit_manifest(settings=settings, path=manifest, batch_name=name, model_set_name=MODEL_SET, tenant=TENANT)
    return result.batch_id


def _set_status(sessions: Sessions, batch_id: str, status: JobStatus, count: int | None = None) -> None:
    """As a worker or a cancel would, in short: the batch's first `count` jobs (all by default) end."""
    with transaction(sessions) as session:
        ids = list(session.scalars(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.line)))[:count]
        stmt = update(Job).where(Job.id.in_(ids)).values(status=status.value, finished_at=utcnow(), error_type="X")
        session.execute(stmt)


def _statuses(sessions: Sessions, batch_id: str) -> list[str]:
    with sessions() as session:
        return list(session.scalars(select(Job.status).where(Job.batch_id == batch_id).order_by(Job.line)))


def _retry(sessions: Sessions, batch_id: str) -> list[str]:
    return retry_failed(sessions=sessions, batch_id=batch_id, within_quotas=check_quotas)


def test_a_retry_that_would_pass_the_images_quota_is_refused_as_a_whole(
    quota_settings: Settings, sessions: Sessions, tmp_path: Path
) -> None:
    _limit(sessions, images_per_day=4)
    failed = _submit(quota_settings, tmp_path, "failed", 3)
    _set_status(sessions, failed, JobStatus.failed)  # their three images given back
    live = _submit(quota_settings, tmp_path, "live", 2)  # fits: 2 of 4

    with pytest.raises(QuotaExceeded) as refused:  # 2 live + 3 again = 5 > 4
        _retry(sessions, failed)

    e = refused.value
    assert (e.tenant, e.quota, e.limit, e.used, e.requested) == (TENANT, "images_per_day", 4, 2, 3)
    assert _statuses(sessions, failed) == ["failed"] * 3  # nothing re-queued
    _set_status(sessions, live, JobStatus.canceled, count=1)  # one live job's image is not coming
    assert len(_retry(sessions, failed)) == 3  # 1 + 3 fits
    assert _statuses(sessions, failed) == ["queued"] * 3
    with pytest.raises(QuotaExceeded):  # the retried jobs count: the quota is full
        _submit(quota_settings, tmp_path, "more", 1)


def test_a_spent_gpu_seconds_quota_refuses_a_retry(
    quota_settings: Settings, sessions: Sessions, tmp_path: Path
) -> None:
    _limit(sessions, gpu_s_per_day=10.0)
    failed = _submit(quota_settings, tmp_path, "failed", 2)
    _set_status(sessions, failed, JobStatus.failed)
    with transaction(sessions) as session:
        session.add(
            UsageRollup(
                tenant=TENANT, day=utcnow().date(), batch_id="b", lane="bulk", model_set=MODEL_SET,
                jobs=5, images=5, gpu_s=10.0, lost_gpu_s=0.0, pixel_steps=0, queue_s=0.0, total_s=0.0,
            )
        )  # fmt: skip

    with pytest.raises(QuotaExceeded) as refused:
        _retry(sessions, failed)

    assert (refused.value.quota, refused.value.used) == ("gpu_s_per_day", 10.0)
    assert _statuses(sessions, failed) == ["failed"] * 2


def test_concurrent_retries_never_pass_the_quota_together(
    quota_settings: Settings, sessions: Sessions, tmp_path: Path, sessions_of: Callable[[], Sessions]
) -> None:
    """Two batches of 3 failed jobs retried at once, each from its own engine, under a quota of 4:
    one is re-queued, the other refused, whatever the interleaving."""
    _limit(sessions, images_per_day=4)
    batches = []
    for name in ("one", "two"):
        batches.append(_submit(quota_settings, tmp_path, name, 3))
        _set_status(sessions, batches[-1], JobStatus.failed)
    outcomes: dict[str, str] = {}
    gate = threading.Barrier(len(batches))

    def retry(batch_id: str) -> None:
        sessions = sessions_of()
        gate.wait()
        try:
            ids = retry_failed(sessions=sessions, batch_id=batch_id, within_quotas=check_quotas)
            outcomes[batch_id] = f"re-queued {len(ids)}"
        except QuotaExceeded:
            outcomes[batch_id] = "refused"
        except Exception as e:
            outcomes[batch_id] = repr(e)

    threads = [threading.Thread(target=retry, args=(batch_id,)) for batch_id in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert sorted(outcomes.values()) == ["re-queued 3", "refused"], outcomes
    assert sorted(_statuses(sessions, b).count("queued") for b in batches) == [0, 3]


def test_the_api_answers_a_retry_over_a_quota_with_429_quota_exceeded(
    quota_settings: Settings, sessions: Sessions, tmp_path: Path
) -> None:
    key, _ = make_key(quota_settings, TENANT)
    failed = _submit(quota_settings, tmp_path, "failed", 3)
    _set_status(sessions, failed, JobStatus.failed)
    _limit(sessions, images_per_day=2)  # lowered since

    with TestClient(create_app(quota_settings, dispatcher=False), raise_server_exceptions=False) as client:
        r = client.post(f"/v1/batches/{failed}/retry", headers={"Authorization": f"Bearer {key}"})

    assert_problem(r, 429, "quota-exceeded", "images_per_day")
    assert (r.json()["quota"], r.json()["requested"]) == ("images_per_day", 3)
    assert _statuses(sessions, failed) == ["failed"] * 3
    with sessions() as session:  # counted, as a refused submission is (ipab_quota_refusals_total)
        assert refusals(session=session) == [(TENANT, "images_per_day", 1)]


def test_the_api_refuses_a_retry_that_would_pass_the_queued_jobs_cap(
    quota_settings: Settings, sessions: Sessions, tmp_path: Path
) -> None:
    """Queued again, failed jobs count against IPAB_API_MAX_QUEUED_JOBS as a submission's would."""
    key, _ = make_key(quota_settings, TENANT)
    headers = {"Authorization": f"Bearer {key}"}
    failed = _submit(quota_settings, tmp_path, "failed", 3)
    _set_status(sessions, failed, JobStatus.failed)
    live = _submit(quota_settings, tmp_path, "live", 2)
    capped = quota_settings.model_copy(update={"api_max_queued_jobs": 4})

    with TestClient(create_app(capped, dispatcher=False), raise_server_exceptions=False) as client:
        refused = client.post(f"/v1/batches/{failed}/retry", headers=headers)  # 2 queued + 3 = 5 > 4
        assert_problem(refused, 429, "queue-full", "IPAB_API_MAX_QUEUED_JOBS")
        assert refused.headers["Retry-After"]
        assert _statuses(sessions, failed) == ["failed"] * 3  # nothing re-queued
        _set_status(sessions, live, JobStatus.canceled, count=1)
        accepted = client.post(f"/v1/batches/{failed}/retry", headers=headers)  # 1 + 3 fits

    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["retried"] == 3
    assert _statuses(sessions, failed) == ["queued"] * 3


def test_ipab_retry_over_a_quota_exits_2_with_one_line(
    quota_settings: Settings,
    sessions: Sessions,
    tmp_path: Path,
    settings_env: Callable[[Settings], dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    failed = _submit(quota_settings, tmp_path, "failed", 3)
    _set_status(sessions, failed, JobStatus.failed)
    _limit(sessions, images_per_day=2)  # lowered since

    run: Run = run_ipab(
        ["retry", "failed", "--failed"], env=settings_env(quota_settings), monkeypatch=monkeypatch,
        modules=("scheduler.cli.batches", "scheduler.cli.ops"),
    )  # fmt: skip

    assert run.code == 2 and run.out == "", run
    assert len(run.err.strip().splitlines()) == 1 and "quota images_per_day = 2 images" in run.err, run.err
    assert _statuses(sessions, failed) == ["failed"] * 3
