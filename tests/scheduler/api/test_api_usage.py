"""GET /v1/usage (a tenant its own, an admin every tenant's), /v1/quotas (admin keys set them), and
the 429 `quota-exceeded` problem of a submission that would pass one, with limit, used and reset."""

from __future__ import annotations

import json
from datetime import date
from typing import Final

from fastapi.testclient import TestClient

from shared.db import UsageRollup, make_engine, make_session_factory
from shared.jobs import transaction
from shared.settings import Settings
from tests.scheduler.api.conftest import JOB, assert_problem, upload

JSONL: Final = {"content-type": "application/jsonl"}


def _usage(settings: Settings) -> None:
    rows = [
        ("alice", date(2026, 12, 1), 3, 6.0),
        ("alice", date(2026, 12, 2), 2, 4.0),
        ("bob", date(2026, 12, 1), 9, 9),
    ]
    with transaction(make_session_factory(make_engine(settings.database_url))) as session:
        for tenant, day, images, gpu_s in rows:
            session.add(
                UsageRollup(
                    tenant=tenant, day=day, batch_id=f"{tenant}-b", lane="bulk", model_set="tiny", jobs=images,
                    images=images, gpu_s=gpu_s, lost_gpu_s=1.0, pixel_steps=100, queue_s=0.5, total_s=2.0,
                )
            )  # fmt: skip


def test_a_tenant_sees_its_own_usage_and_an_admin_sees_everyones(
    client: TestClient, api_settings: Settings, alice: dict[str, str], admin: dict[str, str]
) -> None:
    _usage(api_settings)
    mine = client.get("/v1/usage", headers=alice)
    assert mine.status_code == 200, mine.text
    assert [(r["tenant"], r["day"], r["images"], r["gpu_seconds"]) for r in mine.json()["rows"]] == [
        ("alice", "2026-12-01", 3, 6.0),
        ("alice", "2026-12-02", 2, 4.0),
    ]
    assert_problem(client.get("/v1/usage?tenant=bob", headers=alice), 403, "its own usage only")
    everyone = client.get("/v1/usage?by=lane&since=2026-12-01&until=2026-12-01", headers=admin).json()
    assert everyone["totals"] == {
        "alice": {"jobs": 3, "images": 3, "gpu_seconds": 6.0, "lost_gpu_seconds": 1.0, "pixel_steps": 100,
                  "queue_seconds": 0.5, "total_seconds": 2.0},
        "bob": {"jobs": 9, "images": 9, "gpu_seconds": 9.0, "lost_gpu_seconds": 1.0, "pixel_steps": 100,
                "queue_seconds": 0.5, "total_seconds": 2.0},
    }  # fmt: skip
    assert_problem(client.get("/v1/usage?since=2026-12-02&until=2026-12-01", headers=admin), 422, "before")


def test_admin_keys_set_quotas_and_a_tenant_reads_its_own(
    client: TestClient, alice: dict[str, str], admin: dict[str, str]
) -> None:
    assert_problem(client.put("/v1/quotas/alice", headers=alice, json={"images_per_day": 1}), 403, "admin key")
    put = client.put("/v1/quotas/alice", headers=admin, json={"images_per_day": 100, "max_running": 2})
    assert put.status_code == 200, put.text
    assert put.json()["alice"]["images_per_day"]["limit"] == 100
    lifted = client.put("/v1/quotas/alice", headers=admin, json={"max_running": None}).json()["alice"]
    assert (lifted["images_per_day"]["limit"], lifted["max_running"]["limit"]) == (100, None)
    assert_problem(client.put("/v1/quotas/alice", headers=admin, json={"images_per_day": -1}), 422)
    assert_problem(client.put("/v1/quotas/alice", headers=admin, json={"images": 1}), 422)
    own = client.get("/v1/quotas", headers=alice).json()
    assert list(own) == ["alice"] and own["alice"]["images_per_day"]["used"] == 0
    assert client.delete("/v1/quotas/alice", headers=admin).json() == {"tenant": "alice", "cleared": True}


def test_a_batch_over_the_quota_is_refused_with_429_quota_exceeded(
    client: TestClient, alice: dict[str, str], bob: dict[str, str], admin: dict[str, str]
) -> None:
    assert client.put("/v1/quotas/alice", headers=admin, json={"images_per_day": 3}).status_code == 200
    ref = upload(client, alice)
    rows = "".join(json.dumps({**JOB, "seed": i, "references": [ref]}) + "\n" for i in range(4))

    refused = client.post("/v1/batches", headers={**alice, **JSONL}, content=rows)

    assert_problem(refused, 429, "images_per_day")
    problem = refused.json()
    assert problem["type"] == "https://ipab.dev/problems/quota-exceeded"
    assert (problem["quota"], problem["limit"], problem["used"], problem["requested"]) == ("images_per_day", 3, 0, 4)
    assert problem["resets_at"].endswith("T00:00:00Z") and 0 < int(refused.headers["Retry-After"]) <= 86400
    # Three fit; then a single job is one too many; bob has no quota.
    three = "".join(json.dumps({**JOB, "seed": i, "references": [ref]}) + "\n" for i in range(3))
    assert client.post("/v1/batches", headers={**alice, **JSONL}, content=three).status_code == 202
    single = client.post("/v1/jobs", headers=alice, json={**JOB, "references": [ref]})
    assert_problem(single, 429, "quota-exceeded")
    bob_ref = upload(client, bob)
    assert client.post("/v1/jobs", headers=bob, json={**JOB, "references": [bob_ref]}).status_code == 202


def test_the_job_view_shows_its_metrics(client: TestClient, alice: dict[str, str]) -> None:
    ref = upload(client, alice)
    job = client.post("/v1/jobs", headers=alice, json={**JOB, "references": [ref]}).json()
    view = client.get(f"/v1/jobs/{job['id']}", headers=alice).json()
    model_set = client.get(f"/v1/batches/{view['batch_id']}", headers=alice).json()["model_set"]
    # Not run yet: nothing used, its batch's model set, no device.
    assert model_set and view["metrics"] == {
        "gpu_seconds": None, "lost_gpu_seconds": 0.0, "queue_seconds": None, "total_seconds": None, "images": 0,
        "steps": None, "pixel_steps": None, "model_set": model_set, "device": None,
    }  # fmt: skip


def test_the_operators_metrics_count_usage_and_refusals_per_tenant(
    client: TestClient, api_settings: Settings, alice: dict[str, str], admin: dict[str, str]
) -> None:
    from prometheus_client import generate_latest

    from scheduler.api.metrics import ApiMetrics

    _usage(api_settings)
    client.put("/v1/quotas/alice", headers=admin, json={"images_per_day": 0})
    ref = upload(client, alice)
    assert client.post("/v1/jobs", headers=alice, json={**JOB, "references": [ref]}).status_code == 429

    text = generate_latest(ApiMetrics(make_session_factory(make_engine(api_settings.database_url))).registry).decode()

    assert 'ipab_tenant_gpu_seconds_total{tenant="alice"} 10.0' in text
    assert 'ipab_tenant_lost_gpu_seconds_total{tenant="bob"} 1.0' in text
    assert 'ipab_tenant_images_total{tenant="bob"} 9.0' in text
    assert 'ipab_quota_refusals_total{quota="images_per_day",tenant="alice"} 1.0' in text
