"""Retention through the API: `expires_after` on jobs and batches, a tenant's default set by an admin,
`expires_at` in the views, DELETE of jobs and batches (tenant-scoped, 202 then gone), 410 for a removed image.
On SQLite and PostgreSQL."""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from shared import keys
from shared.db import Job, make_engine, make_session_factory, utcnow
from shared.janitor.loop import janitor_pass
from shared.jobs import JobResult, claim_job, finish_job, transaction
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.scheduler.api.conftest import png_bytes


@pytest.fixture
def api_settings(api_settings: Settings, database_url: str) -> Settings:
    """The API's settings on the test's database (SQLite, then PostgreSQL)."""
    return api_settings.model_copy(update={"database_url": database_url})


def _reference(client: TestClient, headers: dict[str, str]) -> str:
    created = client.post("/v1/references", headers=headers, files={"file": ("a.png", png_bytes(), "image/png")})
    assert created.status_code == 201, created.text
    ref_id: str = created.json()["id"]
    return ref_id


def _job(client: TestClient, headers: dict[str, str], ref: str, **fields: Any) -> str:
    created = client.post("/v1/jobs", headers=headers, json={"prompt": "a cat", "references": [ref], **fields})
    assert created.status_code == 202, created.text
    job_id: str = created.json()["id"]
    return job_id


def _retention_of(settings: Settings, job_id: str) -> int | None:
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            value: int | None = session.scalar(select(Job.expires_after_s).where(Job.id == job_id))
            return value
    finally:
        engine.dispose()


def _finish_as_a_worker_would(settings: Settings, job_id: str) -> str:
    """Claim the job, upload its PNG, mark it succeeded; the output's key."""
    engine = make_engine(settings.database_url)
    try:
        sessions = make_session_factory(engine)
        attempt = claim_job(sessions=sessions, job_id=job_id, worker_host="gpu-1", lease_s=60, max_attempts=3)
        assert attempt is not None
        with sessions() as session:
            batch_id = session.scalars(select(Job.batch_id).where(Job.id == job_id)).one()
        key = keys.output_key(batch_id, job_id, attempt)
        ObjectStore.from_settings(settings).put(key, b"png")
        result = JobResult(output_key=key, output_sha256="ab" * 32, output_bytes=3, encode_s=0, denoise_s=1, upload_s=0)
        assert finish_job(sessions=sessions, job_id=job_id, attempt=attempt, result=result)
        return key
    finally:
        engine.dispose()


def _sweep(settings: Settings) -> None:
    """Janitor passes until nothing waits, as the loop in the workers runs them."""
    engine = make_engine(settings.database_url)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        sessions = make_session_factory(engine)
        store = ObjectStore.from_settings(settings)
        while janitor_pass(sessions=sessions, store=store, redis_client=client, settings=settings).more:
            pass
    finally:
        client.close()
        engine.dispose()


def _expire(settings: Settings, job_id: str) -> None:
    engine = make_engine(settings.database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            session.execute(update(Job).where(Job.id == job_id).values(expires_at=utcnow() - timedelta(seconds=1)))
    finally:
        engine.dispose()


def _when(text: str) -> datetime:
    return datetime.fromisoformat(text.removesuffix("Z"))


def test_a_job_keeps_the_retention_it_names_and_shows_when_its_image_expires(
    client: TestClient, alice: dict[str, str], api_settings: Settings
) -> None:
    ref = _reference(client, alice)
    job_id = _job(client, alice, ref, expires_after="2h")
    assert _retention_of(api_settings, job_id) == 7200
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["expires_at"] is None  # counted from its end

    _finish_as_a_worker_would(api_settings, job_id)

    view = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    finished = _when(view["timings"]["finished_at"])
    assert abs((_when(view["expires_at"]) - finished).total_seconds() - 7200) < 1
    assert view["data_removed_at"] is None and view["image_url"] is not None
    batch = client.get(f"/v1/batches/{view['batch_id']}", headers=alice).json()
    assert batch["expires_at"] == view["expires_at"]


def test_a_bad_retention_is_refused_naming_the_field_and_the_value(client: TestClient, alice: dict[str, str]) -> None:
    ref = _reference(client, alice)
    refused = client.post("/v1/jobs", headers=alice, json={"prompt": "p", "references": [ref], "expires_after": "5m"})
    assert refused.status_code == 422
    assert "expires_after" in refused.text and "5m" in refused.text and "1h" in refused.text

    body = b'{"prompt": "p", "references": ["' + ref.encode() + b'"]}\n'
    jsonl = {**alice, "Content-Type": "application/jsonl"}
    bad = client.post("/v1/batches?expires_after=soon", headers=jsonl, content=body)
    assert bad.status_code == 422 and "expires_after" in bad.text and "soon" in bad.text


def test_a_batch_gives_its_retention_to_the_rows_that_name_none(
    client: TestClient, alice: dict[str, str], api_settings: Settings
) -> None:
    ref = _reference(client, alice)
    rows = [
        {"prompt": "kept a week", "references": [ref], "id": "a"},
        {"prompt": "kept for ever", "references": [ref], "id": "b", "expires_after": "never"},
    ]
    body = "\n".join(json.dumps(r) for r in rows).encode()
    headers = {**alice, "Content-Type": "application/jsonl"}
    created = client.post("/v1/batches?expires_after=7d", headers=headers, content=body)
    assert created.status_code == 202, created.text
    results = client.get(f"/v1/batches/{created.json()['id']}/results", headers=alice).text.splitlines()
    retentions = {json.loads(line)["id"]: None for line in results}
    engine = make_engine(api_settings.database_url)
    with make_session_factory(engine)() as session:
        for client_id, seconds in session.execute(select(Job.client_id, Job.expires_after_s)):
            retentions[client_id] = seconds
    engine.dispose()
    assert retentions == {"a": 7 * 86400, "b": None}


def test_an_admin_sets_a_tenants_default_retention_and_its_new_jobs_take_it(
    client: TestClient, alice: dict[str, str], admin: dict[str, str], api_settings: Settings
) -> None:
    assert client.put("/v1/tenants/alice/retention", headers=alice, json={"expires_after": "30d"}).status_code == 403
    bad = client.put("/v1/tenants/alice/retention", headers=admin, json={"expires_after": "30 days"})
    assert bad.status_code == 422 and "30 days" in bad.text

    put = client.put("/v1/tenants/alice/retention", headers=admin, json={"expires_after": "30d"})

    assert put.status_code == 200, put.text
    assert put.json() == {"tenant": "alice", "expires_after": "30d", "fleet_expires_after": "never"}
    assert client.get("/v1/tenants/alice/retention", headers=admin).json()["expires_after"] == "30d"
    ref = _reference(client, alice)
    assert _retention_of(api_settings, _job(client, alice, ref)) == 30 * 86400
    assert _retention_of(api_settings, _job(client, alice, ref, expires_after="1h")) == 3600  # the job's own wins


def test_deleting_a_job_is_tenant_scoped_accepted_at_once_and_done_by_the_janitor(
    client: TestClient, alice: dict[str, str], bob: dict[str, str], api_settings: Settings
) -> None:
    ref = _reference(client, alice)
    job_id = _job(client, alice, ref)
    output = _finish_as_a_worker_would(api_settings, job_id)

    assert client.delete(f"/v1/jobs/{job_id}", headers=bob).status_code == 404  # not bob's: as if absent
    first = client.delete(f"/v1/jobs/{job_id}", headers=alice)
    again = client.delete(f"/v1/jobs/{job_id}", headers=alice)

    assert (first.status_code, first.json()) == (202, {"id": job_id, "status": "deleting"})
    assert again.status_code == 202
    _sweep(api_settings)
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).status_code == 404
    assert client.delete(f"/v1/jobs/{job_id}", headers=alice).status_code == 404
    assert not ObjectStore.from_settings(api_settings).exists(output)


def test_deleting_a_batch_cancels_its_queued_jobs_and_removes_it(
    client: TestClient, alice: dict[str, str], bob: dict[str, str], api_settings: Settings
) -> None:
    ref = _reference(client, alice)
    done, waiting = _job(client, alice, ref), _job(client, alice, ref)
    _finish_as_a_worker_would(api_settings, done)
    batch_id = client.get(f"/v1/jobs/{done}", headers=alice).json()["batch_id"]

    assert client.delete(f"/v1/batches/{batch_id}", headers=bob).status_code == 404
    assert client.delete(f"/v1/batches/{batch_id}", headers=alice).status_code == 202
    assert client.get(f"/v1/jobs/{waiting}", headers=alice).json()["status"] == "canceled"
    assert client.get(f"/v1/batches/{batch_id}", headers=alice).json()["status"] == "deleting"
    _sweep(api_settings)

    assert client.get(f"/v1/batches/{batch_id}", headers=alice).status_code == 404
    assert ObjectStore.from_settings(api_settings).list_keys(keys.outputs_prefix(batch_id)) == []
    # The tenant's upload is its own to keep: deleting a batch leaves its references.
    assert client.get(f"/v1/references/{ref}", headers=alice).status_code == 200


def test_deleting_a_batch_twice_is_accepted_both_times_and_done_once(
    client: TestClient, alice: dict[str, str], api_settings: Settings
) -> None:
    ref = _reference(client, alice)
    done, waiting = _job(client, alice, ref), _job(client, alice, ref)
    _finish_as_a_worker_would(api_settings, done)
    batch_id = client.get(f"/v1/jobs/{done}", headers=alice).json()["batch_id"]

    first = client.delete(f"/v1/batches/{batch_id}", headers=alice)
    again = client.delete(f"/v1/batches/{batch_id}", headers=alice)

    assert (first.status_code, first.json()) == (202, {"id": batch_id, "status": "deleting"})
    assert (again.status_code, again.json()) == (202, {"id": batch_id, "status": "deleting"})
    assert client.get(f"/v1/jobs/{waiting}", headers=alice).json()["status"] == "canceled"
    _sweep(api_settings)
    assert client.get(f"/v1/batches/{batch_id}", headers=alice).status_code == 404
    assert client.delete(f"/v1/batches/{batch_id}", headers=alice).status_code == 404  # done: as if absent
    assert ObjectStore.from_settings(api_settings).list_keys(keys.outputs_prefix(batch_id)) == []


def test_an_expired_image_answers_410_and_its_record_says_when_it_went(
    client: TestClient, alice: dict[str, str], api_settings: Settings
) -> None:
    ref = _reference(client, alice)
    job_id = _job(client, alice, ref, expires_after="1h")
    _finish_as_a_worker_would(api_settings, job_id)
    _expire(api_settings, job_id)
    _sweep(api_settings)

    view = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
    image = client.get(f"/v1/jobs/{job_id}/image", headers=alice, follow_redirects=False)

    assert view["status"] == "succeeded" and view["image_url"] is None and view["data_removed_at"] is not None
    assert image.status_code == 410 and "removed" in image.json()["detail"]
    (line,) = client.get(f"/v1/batches/{view['batch_id']}/results", headers=alice).text.splitlines()
    assert '"output_uri": null' in line and '"data_removed_at": "' in line
