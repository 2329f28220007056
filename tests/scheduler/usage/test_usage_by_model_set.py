"""Usage per model set: `ipab usage --by model_set` and `GET /v1/usage?by=model_set` sum what the
jobs that ended on each set used (a succeeded job's render, a canceled one's steps), per tenant; a
tenant's report holds its own sets only, the operator's every tenant's."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from typing import Any, Final

import pytest
from fastapi.testclient import TestClient

from scheduler.batches.actions import cancel
from shared.db import Batch, insert_new_jobs, make_engine, make_session_factory, new_id, utcnow
from shared.jobs import claim_job, finish_job, record_left_attempt, transaction
from shared.settings import Settings
from shared.usage import AttemptUsage
from tests.conftest import metered_result
from tests.scheduler.submission.conftest import run_ipab

PIXELS: Final = 64 * 64
STEPS: Final = 4
# tenant -> model set -> (gpu_s of each job that succeeded, gpu_s and steps of a job canceled while it ran)
JOBS: Final = {
    "alice": {"tiny": ([1.0, 1.5], None), "fast": ([0.5], (0.25, 2))},
    "bob": {"tiny": ([2.0], None)},
}
# (tenant, model set, jobs, images, gpu_seconds, pixel_steps), in report order
EXPECTED: Final = [
    ("alice", "fast", 2, 1, 0.75, PIXELS * (STEPS + 2)),
    ("alice", "tiny", 2, 2, 2.5, PIXELS * STEPS * 2),
    ("bob", "tiny", 1, 1, 2.0, PIXELS * STEPS),
]


def _batch(settings: Settings, tenant: str, model_set: str, count: int) -> tuple[str, list[str]]:
    with transaction(make_session_factory(make_engine(settings.database_url))) as session:
        batch = Batch(id=new_id(), name=f"{tenant}-{model_set}", model_set=model_set, job_count=count, tenant=tenant)
        session.add(batch)
        session.flush()
        rows = [(new_id(), i, None, f"k{i}", "{}", i, "bulk") for i in range(count)]
        insert_new_jobs(session, batch_id=batch.id, queued_at=utcnow(), rows=rows)
    return batch.id, [row[0] for row in rows]


def _end_jobs(settings: Settings) -> None:
    """Every job of JOBS run and ended as a worker (and a cancel) would end it: finished, or
    canceled while it ran and its steps reported."""
    sessions = make_session_factory(make_engine(settings.database_url))
    for tenant, sets in JOBS.items():
        for model_set, (succeeded, canceled) in sets.items():
            batch_id, ids = _batch(settings, tenant, model_set, len(succeeded) + (canceled is not None))
            attempts = [
                claim_job(sessions=sessions, job_id=i, worker_host="w", lease_s=30, max_attempts=3) for i in ids
            ]
            for job_id, attempt, gpu_s in zip(ids, attempts, succeeded, strict=False):
                assert attempt is not None
                assert finish_job(sessions=sessions, job_id=job_id, attempt=attempt, result=metered_result(gpu_s))
            if canceled is not None:
                attempt = attempts[-1]
                assert attempt is not None
                with transaction(sessions) as session:
                    assert cancel(session=session, batch_id=batch_id) == [ids[-1]]
                usage = AttemptUsage(gpu_s=canceled[0], steps_run=canceled[1], pixels=PIXELS)
                assert record_left_attempt(
                    sessions=sessions, job_id=ids[-1], attempt=attempt, usage=usage, reported_s=0
                )


def _figures(rows: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
    return [
        (r["tenant"], r["model_set"], int(r["jobs"]), int(r["images"]), float(r["gpu_seconds"]), int(r["pixel_steps"]))
        for r in rows
    ]


def test_the_api_reports_a_tenants_usage_per_model_set_and_the_admin_everyones(
    client: TestClient,
    api_settings: Settings,
    alice: dict[str, str],
    bob: dict[str, str],
    admin: dict[str, str],
) -> None:
    _end_jobs(api_settings)

    mine = client.get("/v1/usage?by=model_set", headers=alice)
    everyone = client.get("/v1/usage?by=model_set", headers=admin)

    assert mine.status_code == everyone.status_code == 200, (mine.text, everyone.text)
    assert mine.json()["by"] == "model_set"
    assert _figures(mine.json()["rows"]) == [row for row in EXPECTED if row[0] == "alice"]
    assert _figures(everyone.json()["rows"]) == EXPECTED
    assert everyone.json()["totals"]["alice"]["gpu_seconds"] == pytest.approx(3.25)


def test_ipab_usage_by_model_set_as_json_and_csv(
    api_settings: Settings,
    alice: dict[str, str],
    bob: dict[str, str],
    settings_env: Callable[[Settings], dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _end_jobs(api_settings)
    env = settings_env(api_settings)

    def ipab(*argv: str) -> str:
        run = run_ipab(list(argv), env=env, monkeypatch=monkeypatch, modules=("scheduler.cli.usage",))
        assert run.code == 0, run.err
        return run.out

    report = json.loads(ipab("usage", "--by", "model_set", "--json"))
    assert report["by"] == "model_set" and _figures(report["rows"]) == EXPECTED
    rows = list(csv.DictReader(io.StringIO(ipab("usage", "--by", "model_set", "--tenant", "alice", "--csv"))))
    assert list(rows[0])[:2] == ["tenant", "model_set"]
    assert _figures(rows) == [row for row in EXPECTED if row[0] == "alice"]
