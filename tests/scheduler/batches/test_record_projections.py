"""One job, three faces: `ipab results`, `GET /v1/jobs/{id}` and the webhook's data are projections
of one record, so they agree on every field they share."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from scheduler.batches.events import outbox_job_events
from shared.db import Job, WebhookMessage, make_engine, make_session_factory, utcnow
from shared.jobs import transaction
from shared.settings import Settings
from tests.scheduler.api.conftest import png_bytes
from tests.scheduler.submission.conftest import run_ipab

DONE = {
    "status": "succeeded",
    "output_key": "outputs/b/j.1.png",
    "output_sha256": "ab" * 32,
    "output_bytes": 1234,
    "encode_s": 0.25,
    "denoise_s": 1.5,
    "upload_s": 0.125,
    "worker_host": "gpu-7",
    "render_batch_size": 2,
    "attempts": 1,
    "cache_stats": json.dumps({"lru_hits": 1, "encodes": 0}),
}


def _finish_as_a_worker_would(settings: Settings, job_id: str) -> dict[str, Any]:
    """Mark the job succeeded with its figures, write its outbox row; the webhook payload's data."""
    engine = make_engine(settings.database_url)
    try:
        sessions = make_session_factory(engine)
        with transaction(sessions) as session:
            now = utcnow()
            session.execute(update(Job).where(Job.id == job_id).values(started_at=now, finished_at=now, **DONE))
            assert outbox_job_events(session=session) == 1
            payload = session.scalars(select(WebhookMessage.payload)).one()
    finally:
        engine.dispose()
    data: dict[str, Any] = json.loads(payload)["data"]
    return data


def test_results_line_api_view_and_webhook_data_agree_on_one_job(
    client: TestClient,
    alice: dict[str, str],
    api_settings: Settings,
    settings_env: Callable[[Settings], dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref = client.post("/v1/references", headers=alice, files={"file": ("a.png", png_bytes(), "image/png")}).json()
    body = {
        "prompt": "a cat",
        "references": [ref["id"]],
        "steps": 2,
        "seed": 7,
        "id": "row-1",
        "webhook": {"url": "http://127.0.0.1:9/hook", "events": ["job.succeeded"]},
    }
    created = client.post("/v1/jobs", headers=alice, json=body)
    assert created.status_code in (200, 201, 202), created.text
    job_id = created.json()["id"]
    webhook = _finish_as_a_worker_would(api_settings, job_id)

    view = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    run = run_ipab(["results", view["batch_id"]], env=settings_env(api_settings), monkeypatch=monkeypatch)
    assert run.code == 0, run.err
    (line,) = [json.loads(text) for text in run.out.splitlines()]

    # Identity, status, output and error: the same in all three.
    for cli_name, api_name in (("job_id", "id"), ("id", "client_id"), ("batch_id", "batch_id")):
        assert line[cli_name] == view[api_name] == webhook[api_name]
    for name in ("status", "output_sha256", "error"):
        assert line[name] == view[name] == webhook[name]
    assert (line["id"], line["status"], line["error"]) == ("row-1", "succeeded", None)
    # Parameters, references, timings and size: the CLI line and the API view.
    params = {name: line[name] for name in view["params"]}
    assert params == view["params"] and view["params"]["seed"] == 7 and view["params"]["prompt"] == "a cat"
    assert [r["sha256"] for r in line["references"]] == view["references"] == [ref["id"]]
    # The operator's line has the fleet's figures too (encode time, batch size, the whole call's denoising
    # time); the tenant's view has the job's share of the call (1.5 s for 2 jobs) and nothing of the rest.
    tenant_timings = {k: v for k, v in line["timings"].items() if k != "encode_s"} | {"denoise_s": 0.75}
    assert tenant_timings == view["timings"]
    assert line["timings"]["finished_at"].endswith("Z") and line["timings"]["denoise_s"] == 1.5
    for name in ("output_bytes", "attempts"):
        assert line[name] == view[name] == DONE[name]
    assert line["render_batch_size"] == DONE["render_batch_size"] and "render_batch_size" not in view
