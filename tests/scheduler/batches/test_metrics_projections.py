"""A job's `metrics` (what it used) are one projection of its record: `ipab results`, GET /v1/jobs/{id},
the batch results the API streams and the webhook's data all show the same figures."""

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

PROVENANCE = {"model_set": "tiny", "device_name": "NVIDIA H200", "device": "cuda:0"}
USAGE = {"gpu_s": 1.25, "lost_gpu_s": 0.5, "steps_run": 4, "pixel_steps": 64 * 64 * 4, "queue_s": 2.0, "total_s": 4.5}
METRICS = {
    "gpu_seconds": 1.25,
    "lost_gpu_seconds": 0.5,
    "queue_seconds": 2.0,
    "total_seconds": 4.5,
    "images": 1,
    "steps": 4,
    "pixel_steps": 64 * 64 * 4,
    "model_set": "tiny",
    "device": "NVIDIA H200",
}


def _finished(settings: Settings, job_id: str) -> dict[str, Any]:
    """The job succeeded with its usage, as a worker's finish writes it; the webhook payload's data."""
    sessions = make_session_factory(make_engine(settings.database_url))
    with transaction(sessions) as session:
        now = utcnow()
        values = {"status": "succeeded", "started_at": now, "finished_at": now, "attempts": 2, **USAGE}
        session.execute(update(Job).where(Job.id == job_id).values(provenance=json.dumps(PROVENANCE), **values))
        assert outbox_job_events(session=session) == 1
        payload = session.scalars(select(WebhookMessage.payload)).one()
    data: dict[str, Any] = json.loads(payload)["data"]
    return data


def test_every_view_of_a_job_shows_the_same_metrics(
    client: TestClient,
    alice: dict[str, str],
    api_settings: Settings,
    settings_env: Callable[[Settings], dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ref = client.post("/v1/references", headers=alice, files={"file": ("a.png", png_bytes(), "image/png")}).json()
    hook = {"url": "http://127.0.0.1:9/hook", "events": ["job.succeeded"]}
    body = {"prompt": "a cat", "references": [ref["id"]], "steps": 4, "width": 64, "height": 64, "webhook": hook}
    job_id = client.post("/v1/jobs", headers=alice, json=body).json()["id"]
    webhook = _finished(api_settings, job_id)

    view = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    streamed = client.get(f"/v1/batches/{view['batch_id']}/results", headers=alice).text.splitlines()
    run = run_ipab(["results", view["batch_id"]], env=settings_env(api_settings), monkeypatch=monkeypatch)
    assert run.code == 0, run.err

    assert view["metrics"] == METRICS
    assert webhook["metrics"] == METRICS
    assert json.loads(run.out.splitlines()[0])["metrics"] == METRICS
    assert json.loads(streamed[0])["metrics"] == METRICS
