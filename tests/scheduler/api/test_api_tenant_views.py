"""A tenant sees only what is theirs (issue 21, item 9): no figure of the shared fleet in any API view.

Two tenants render the same reference image. The second one's job hits the shared embedding
cache, so its `cache_stats` and a near-zero `encode_s` would tell it that somebody else used
that image; `worker_host` names the fleet's machines; `render_batch_size` counts the jobs
(anybody's) rendered in the same pipeline call, and so would the whole call's `denoise_s` next
to the job's share of it (`metrics.gpu_seconds`). The API's results, job view, gallery and
webhook data leave them out (a tenant's `denoise_s` is its share); `ipab results` (the
operator's) keeps them.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, Final

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from scheduler.batches.events import outbox_job_events
from shared.db import Job, WebhookMessage, make_engine, make_session_factory, utcnow
from shared.jobs import transaction
from shared.settings import Settings
from tests.scheduler.api.conftest import png_bytes
from tests.scheduler.submission.conftest import run_ipab

HOST: Final = "gpu-host-7.internal"
OPERATOR_ONLY: Final = ("cache_stats", "worker_host", "encode_s", "render_batch_size")
FINISHED: Final = {
    "alice": {"encode_s": 0.8, "cache_stats": {"lru_misses": 1, "redis_misses": 1, "s3_misses": 1, "encodes": 1}},
    "bob": {"encode_s": 0.0004, "cache_stats": {"lru_misses": 1, "redis_hits": 1, "encodes": 0}},
}


def _submit(client: TestClient, headers: dict[str, str]) -> dict[str, Any]:
    ref = client.post("/v1/references", headers=headers, files={"file": ("same.png", png_bytes(), "image/png")})
    assert ref.status_code == 201, ref.text
    body = {
        "prompt": "a cat",
        "references": [ref.json()["id"]],
        "steps": 2,
        "seed": 7,
        "webhook": {"url": "http://127.0.0.1:9/hook", "events": ["job.succeeded"]},
    }
    created = client.post("/v1/jobs", headers=headers, json=body)
    assert created.status_code == 202, created.text
    job: dict[str, Any] = client.get(f"/v1/jobs/{created.json()['id']}", headers=headers).json()
    return job


def _finish_as_a_worker_would(settings: Settings, job_id: str, figures: dict[str, Any]) -> None:
    engine = make_engine(settings.database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            now = utcnow()
            session.execute(
                update(Job)
                .where(Job.id == job_id)
                .values(
                    status="succeeded",
                    started_at=now,
                    finished_at=now,
                    output_key=f"outputs/{job_id}.png",
                    output_sha256="ab" * 32,
                    output_bytes=1234,
                    denoise_s=1.5,  # the pipeline call's, for its 3 jobs
                    gpu_s=0.5,  # this job's share of it
                    upload_s=0.125,
                    attempts=1,
                    worker_host=HOST,
                    render_batch_size=3,
                    encode_s=figures["encode_s"],
                    cache_stats=json.dumps(figures["cache_stats"]),
                )
            )
            outbox_job_events(session=session)
    finally:
        engine.dispose()


def _webhook_payloads(settings: Settings) -> list[str]:
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            return list(session.scalars(select(WebhookMessage.payload)))
    finally:
        engine.dispose()


def _assert_nothing_of_the_fleet(text: str) -> None:
    for name in (*OPERATOR_ONLY, HOST, "redis_hits", "lru_misses"):
        assert name not in text, (name, text[:2000])


@pytest.fixture
def finished(client: TestClient, alice: dict[str, str], bob: dict[str, str], api_settings: Settings) -> dict[str, Any]:
    """Alice's and Bob's job on the same image, finished (Bob's hit the cache Alice's filled): their views."""
    jobs = {name: _submit(client, headers) for name, headers in (("alice", alice), ("bob", bob))}
    for name, job in jobs.items():
        _finish_as_a_worker_would(api_settings, job["id"], FINISHED[name])
    return jobs


def test_no_api_view_shows_a_tenant_the_shared_cache_the_hosts_or_the_encode_time(
    client: TestClient, alice: dict[str, str], bob: dict[str, str], api_settings: Settings, finished: dict[str, Any]
) -> None:
    for name, headers in (("alice", alice), ("bob", bob)):
        job = finished[name]
        results = client.get(f"/v1/batches/{job['batch_id']}/results", headers=headers)
        assert results.status_code == 200, results.text
        (line,) = [json.loads(text) for text in results.text.splitlines()]
        assert line["status"] == "succeeded" and line["timings"]["upload_s"] == 0.125
        view = client.get(f"/v1/jobs/{job['id']}", headers=headers)
        assert view.json()["status"] == "succeeded" and view.json()["timings"]["finished_at"].endswith("Z")
        gallery = client.get(f"/v1/batches/{job['batch_id']}/gallery", headers=headers)
        assert gallery.status_code == 200
        for text in (results.text, view.text, gallery.text):
            _assert_nothing_of_the_fleet(text)
    payloads = _webhook_payloads(api_settings)
    assert len(payloads) == 2
    for payload in payloads:
        _assert_nothing_of_the_fleet(payload)


def test_the_openapi_job_schema_promises_no_fleet_figure(client: TestClient) -> None:
    schema = client.get("/openapi.json")
    assert schema.status_code == 200
    job_out = schema.json()["components"]["schemas"]["JobOut"]
    assert not set(job_out["properties"]) & set(OPERATOR_ONLY)
    assert "encode_s" not in json.dumps(job_out)


def test_a_tenant_sees_its_jobs_share_of_the_denoising_call_not_the_whole_call(
    client: TestClient, alice: dict[str, str], finished: dict[str, Any]
) -> None:
    """3 jobs rendered in one call of 1.5 s: the tenant is shown 0.5 s, as `gpu_seconds` bills it;
    1.5 s beside 0.5 s would tell it how many jobs, anybody's, shared the call."""
    job = finished["alice"]
    view = client.get(f"/v1/jobs/{job['id']}", headers=alice).json()
    results = client.get(f"/v1/batches/{job['batch_id']}/results", headers=alice)
    (line,) = [json.loads(text) for text in results.text.splitlines()]
    for shown in (view, line):
        assert shown["timings"]["denoise_s"] == pytest.approx(0.5) == shown["metrics"]["gpu_seconds"]


def test_ipab_results_still_shows_the_operator_every_figure(
    api_settings: Settings,
    settings_env: Callable[[Settings], dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    finished: dict[str, Any],
) -> None:
    run = run_ipab(["results", finished["bob"]["batch_id"]], env=settings_env(api_settings), monkeypatch=monkeypatch)
    assert run.code == 0, run.err
    (line,) = [json.loads(text) for text in run.out.splitlines()]
    assert line["worker_host"] == HOST and line["render_batch_size"] == 3
    assert line["cache_stats"] == FINISHED["bob"]["cache_stats"]
    assert line["timings"]["encode_s"] == FINISHED["bob"]["encode_s"]
    assert line["timings"]["denoise_s"] == 1.5  # the whole pipeline call's
