"""`GET /v1/batches/{id}/gallery`: the `ipab gallery` page, per tenant, with credentials masked."""

from __future__ import annotations

import json

from fastapi.testclient import TestClient
from sqlalchemy import select

from scheduler.api.app import create_app
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


def test_the_gallery_comes_in_pages_whatever_the_batchs_size(alice: dict[str, str], api_settings: Settings) -> None:
    """A page holds `per_page` cards in manifest order and says where it stands: a 100,000-job
    batch's page costs what a small one's does (it was one page of every job's thumbnails)."""
    unlimited = api_settings.model_copy(update={"api_rate_per_s": 0})  # a page costs 50 tokens
    with TestClient(create_app(unlimited, dispatcher=False), raise_server_exceptions=False) as client:
        ref = upload(client, alice)
        rows = "\n".join(json.dumps({"references": [ref], "prompt": f"cat {i}", "steps": 2}) for i in range(5))
        created = client.post("/v1/batches", headers={**alice, "content-type": "application/jsonl"}, content=rows)
        gallery = f"/v1/batches/{created.json()['id']}/gallery"
        pages = [client.get(f"{gallery}?page={n}&per_page=2", headers=alice) for n in (1, 2, 3, 4)]
        whole = client.get(gallery, headers=alice)  # 100 a page by default
        too_many = client.get(f"{gallery}?per_page=100000", headers=alice)
        page_0 = client.get(f"{gallery}?page=0", headers=alice)

    assert [p.status_code for p in pages] == [200] * 4
    assert [p.text.count('<article class="card"') for p in pages] == [2, 2, 1, 0]
    assert "cat 0" in pages[0].text and "cat 2" in pages[1].text and "cat 4" in pages[2].text
    assert "cat 2" not in pages[0].text
    nav = [p.text.split('<nav class="pages">')[1].split("</nav>")[0] for p in pages]
    assert nav[1].startswith("jobs 3-4 of 5, page 2 of 3")
    assert 'href="?page=1&amp;per_page=2">previous' in nav[1] and 'href="?page=3&amp;per_page=2">next' in nav[1]
    assert "next" not in nav[2] and "previous" not in nav[0]
    assert nav[3].startswith("page 4 of 3: no jobs here") and 'href="?page=3&amp;per_page=2">previous' in nav[3]
    assert whole.text.count('<article class="card"') == 5
    assert_problem(too_many, 422, "per_page")
    assert_problem(page_0, 422, "page")
