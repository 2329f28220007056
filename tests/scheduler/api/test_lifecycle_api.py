"""What a user of the shared API expects of retention at its edges: a bad `expires_after`, however
written, is a 422 naming the field, showing the value and saying the fix, never a 500; the fleet's retention
and the expiry webhooks carry. On SQLite and PostgreSQL."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from scheduler.batches.events import outbox_batch_events, outbox_job_events
from shared.db import Job, WebhookMessage, make_engine, make_session_factory
from shared.jobs import JobResult, claim_job, finish_job, transaction
from shared.settings import Settings
from tests.scheduler.api.conftest import upload


@pytest.mark.parametrize("database_url", ["sqlite"], indirect=True)  # refused as it is parsed: one database will do
@pytest.mark.parametrize("value", ["9" * 5000, "0", 0, 1.5, [], {"days": 7}])
def test_a_bad_expires_after_of_a_job_or_a_batch_row_is_a_422_that_names_it(
    client: TestClient, alice: dict[str, str], value: object
) -> None:
    ref = upload(client, alice)
    row = {"prompt": "p", "references": [ref], "expires_after": value}
    jsonl = {**alice, "Content-Type": "application/jsonl"}

    for answer in (
        client.post("/v1/jobs", headers=alice, json=row),
        client.post("/v1/batches", headers=jsonl, content=json.dumps(row).encode()),
    ):
        assert answer.status_code == 422, answer.text
        detail = answer.json()["detail"]
        assert "expires_after" in detail and "1h, 7d or 30d" in detail and "is never" not in detail
        assert len(detail) < 600  # the value is shown cut short, not echoed whole


FLEET_S = 7 * 86400


@pytest.fixture
def api_settings(api_settings: Settings, database_url: str) -> Settings:
    """The API's settings with a fleet retention of 7 days (IPAB_RETENTION_OUTPUTS_S=7d), on the test's database."""
    return api_settings.model_copy(update={"retention_outputs_s": FLEET_S, "database_url": database_url})


def _submit(client: TestClient, headers: dict[str, str], ref: str, **fields: Any) -> str:
    hook = {"url": "http://127.0.0.1:9/hook", "events": ["job.succeeded"]}
    created = client.post(
        "/v1/jobs", headers=headers, json={"prompt": "p", "references": [ref], "webhook": hook, **fields}
    )
    assert created.status_code == 202, created.text
    job_id: str = created.json()["id"]
    return job_id


def _finish_and_scan(sessions: sessionmaker[Session], job_id: str) -> None:
    """Finished as a worker finishes it, then the webhook delivery loop's outbox scan (jobs, then batches)."""
    attempt = claim_job(sessions=sessions, job_id=job_id, worker_host="gpu", lease_s=60, max_attempts=3)
    assert attempt is not None
    done = JobResult(output_key="k", output_sha256="ab" * 32, output_bytes=1, encode_s=0, denoise_s=1, upload_s=0)
    assert finish_job(sessions=sessions, job_id=job_id, attempt=attempt, result=done)
    with transaction(sessions) as session:
        outbox_job_events(session=session)
        outbox_batch_events(session=session)


def _payload(sessions: sessionmaker[Session], subject_id: str) -> dict[str, Any]:
    """The one webhook message written for `subject_id`, decoded."""
    with sessions() as session:
        (payload,) = session.scalars(select(WebhookMessage.payload).where(WebhookMessage.subject_id == subject_id))
    decoded: dict[str, Any] = json.loads(payload)
    return decoded


def test_the_fleets_retention_applies_unless_the_tenant_or_the_job_says_otherwise_and_webhooks_say_when(
    client: TestClient, alice: dict[str, str], admin: dict[str, str], api_settings: Settings
) -> None:
    ref = upload(client, alice)
    fleet = _submit(client, alice, ref)
    own = _submit(client, alice, ref, expires_after="2h")
    assert client.put("/v1/tenants/alice/retention", headers=admin, json={"expires_after": "never"}).status_code == 200
    tenants = _submit(client, alice, ref)

    engine = make_engine(api_settings.database_url)
    sessions = make_session_factory(engine)
    try:
        with sessions() as session:
            kept = dict(session.execute(select(Job.id, Job.expires_after_s)).tuples().all())
        assert kept == {fleet: FLEET_S, own: 7200, tenants: None}
        # Finished as a worker finishes it, its job.succeeded message carries the expiry the API shows.
        _finish_and_scan(sessions, fleet)
        payload = _payload(sessions, fleet)
    finally:
        engine.dispose()
    shown = client.get(f"/v1/jobs/{fleet}", headers=alice).json()["expires_at"]
    assert shown is not None and payload["data"]["expires_at"] == shown


def test_a_batch_completed_webhook_says_when_the_batchs_images_expire(
    client: TestClient, alice: dict[str, str], api_settings: Settings
) -> None:
    ref = upload(client, alice)
    rows = [{"prompt": f"p{i}", "references": [ref], "id": str(i)} for i in range(2)]
    created = client.post(
        "/v1/batches?expires_after=2h&webhook_url=http://127.0.0.1:9/hook",
        headers={**alice, "Content-Type": "application/jsonl"},
        content="\n".join(json.dumps(row) for row in rows).encode(),
    )
    assert created.status_code == 202, created.text
    batch_id = created.json()["id"]

    engine = make_engine(api_settings.database_url)
    sessions = make_session_factory(engine)
    try:
        with sessions() as session:
            job_ids = list(session.scalars(select(Job.id).where(Job.batch_id == batch_id).order_by(Job.client_id)))
        for job_id in job_ids:
            _finish_and_scan(sessions, job_id)
        event = _payload(sessions, batch_id)
    finally:
        engine.dispose()

    shown = client.get(f"/v1/batches/{batch_id}", headers=alice).json()["expires_at"]
    last = max(client.get(f"/v1/jobs/{job_id}", headers=alice).json()["expires_at"] for job_id in job_ids)
    assert event["type"] == "batch.completed" and event["data"]["counts"]["succeeded"] == 2
    assert shown is not None and event["data"]["expires_at"] == shown == last  # its last image's expiry
