"""`GET /v1/batches/{id}/gallery`: the `ipab gallery` page, per tenant, with credentials masked."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient
from sqlalchemy import select

from shared.db import Job, make_engine, make_session_factory
from shared.settings import Settings
from tests.scheduler.api.conftest import assert_problem, upload

LEAKY_ERROR = "cannot reach redis://:s3cret-pass@redis.internal:6379/0"


def fail_one_job(settings: Settings, batch_id: str) -> None:
    """Mark the batch's first job failed with an error that quotes an internal URL and its password."""
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine).begin() as session:
            job = session.scalars(select(Job).where(Job.batch_id == batch_id).order_by(Job.line)).first()
            assert job is not None
            job.status, job.error_type, job.error_message = "failed", "TransientError", LEAKY_ERROR
    finally:
        engine.dispose()


def test_the_gallery_has_a_card_per_job_masks_credentials_and_is_the_tenants_own(
    client: TestClient, alice: dict[str, str], bob: dict[str, str], api_settings: Settings
) -> None:
    ref = upload(client, alice)
    rows = "\n".join(json.dumps({"references": [ref], "prompt": f"a <b>cat</b> {i}", "steps": 2}) for i in range(3))
    created = client.post("/v1/batches", headers={**alice, "content-type": "application/jsonl"}, content=rows)
    batch = created.json()["id"]
    fail_one_job(api_settings, batch)

    page = client.get(f"/v1/batches/{batch}/gallery", headers=alice)

    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert page.text.count('<article class="card"') == 3
    assert "a &lt;b&gt;cat&lt;/b&gt; 0" in page.text and "<b>cat" not in page.text  # job text is escaped
    assert "s3cret-pass" not in page.text and "redis://:***@redis.internal:6379/0" in page.text
    assert "data:image/jpeg;base64," in page.text  # reference thumbnails embedded: the page stands alone
    assert "default-src 'none'" in page.headers["content-security-policy"]
    theirs = client.get(f"/v1/batches/{batch}/gallery", headers=bob)
    assert_problem(theirs, 404, f"no batch has id '{batch}'")
