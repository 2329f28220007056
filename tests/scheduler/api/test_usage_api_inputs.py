"""GET /v1/usage and PUT /v1/quotas refuse bad input with 422 naming the query parameter or field,
its value and the fix; a tenant's key reads no other tenant's usage, however it asks."""

from __future__ import annotations

from fastapi.testclient import TestClient

from tests.scheduler.api.conftest import assert_problem


def test_a_range_that_ends_before_it_starts_names_the_api_parameters(client: TestClient, alice: dict[str, str]) -> None:
    r = client.get("/v1/usage?since=2026-12-05&until=2026-12-01", headers=alice)
    assert_problem(r, 422, "before since 2026-12-05", "on or after")
    assert r.json()["errors"] == [{"field": "until", "value": "2026-12-01", "reason": r.json()["errors"][0]["reason"]}]


def test_a_day_that_is_not_one_is_refused_with_its_value(client: TestClient, alice: dict[str, str]) -> None:
    r = client.get("/v1/usage?since=12/01/2026", headers=alice)
    assert_problem(r, 422, "since", "12/01/2026")


def test_an_infinite_gpu_seconds_limit_is_refused(client: TestClient, admin: dict[str, str]) -> None:
    """`inf` is no limit in disguise: stored, `ipab quotas show --json` would print Infinity (not JSON)."""
    for bad in ("inf", "Infinity", "nan"):
        r = client.put("/v1/quotas/alice", headers=admin, json={"gpu_s_per_day": bad})
        assert_problem(r, 422, "gpu_s_per_day")
    assert client.get("/v1/quotas", headers=admin).json() == {}  # nothing was stored


def test_a_tenant_reads_no_other_tenants_usage_however_it_asks(client: TestClient, alice: dict[str, str]) -> None:
    for query in ("tenant=bob", "tenant=ALICE", "tenant=", "tenant=alice&tenant=bob", "tenant=bob&tenant=alice"):
        r = client.get(f"/v1/usage?{query}", headers=alice)
        if r.status_code == 200:
            assert r.json()["tenant"] == "alice", query
        else:
            assert_problem(r, 403, "its own usage only")
