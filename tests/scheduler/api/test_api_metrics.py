"""GET /metrics counts every answered request by method, route template and status."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from tests.scheduler.api.test_api import JOB, upload


def counts(client: TestClient) -> dict[tuple[str, str, str], float]:
    text = client.get("/metrics").text
    found: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ipab_api_requests_total":
                found[(sample.labels["method"], sample.labels["route"], sample.labels["status"])] = sample.value
    return found


def test_requests_are_counted_by_route_template_and_status(client: TestClient, alice: dict[str, str]) -> None:
    ref = upload(client, alice)
    assert client.post("/v1/jobs", headers=alice, json={**JOB, "references": [ref]}).status_code == 202
    assert client.post("/v1/jobs", headers=alice, json={**JOB, "references": [ref], "steps": 0}).status_code == 422
    assert client.get("/v1/jobs/nope", headers=alice).status_code == 404
    assert client.get("/v1/jobs/nope").status_code == 401
    assert client.get("/no/such/route").status_code == 404
    seen = counts(client)
    assert seen[("POST", "/v1/references", "201")] == 1
    assert seen[("POST", "/v1/jobs", "202")] == 1 and seen[("POST", "/v1/jobs", "422")] == 1
    assert seen[("GET", "/v1/jobs/{job_id}", "404")] == 1 and seen[("GET", "/v1/jobs/{job_id}", "401")] == 1
    assert sum(v for (method, route, status), v in seen.items() if status == "404" and "{" not in route) == 1
