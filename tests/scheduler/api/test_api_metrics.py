"""GET /metrics counts every answered request by method, route template and status; it names
tenants, so it is never served on the API's port without a key: on a port of its own
(IPAB_API_METRICS_PORT), or on the API's port to a bearer of IPAB_METRICS_TOKEN."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Final

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from scheduler.api.app import create_app
from shared.settings import Settings
from tests.scheduler.api.conftest import JOB, assert_problem, upload
from tests.scheduler.api.served import free_port

TOKEN: Final = "metrics-token-for-tests-0123456789"
SCRAPER: Final = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def scraped(api_settings: Settings) -> Iterator[TestClient]:
    """A TestClient on an app whose /metrics answers to the bearer of TOKEN."""
    settings = api_settings.model_copy(update={"metrics_token": TOKEN})
    with TestClient(create_app(settings, dispatcher=False), raise_server_exceptions=False) as c:
        yield c


def counts(text: str) -> dict[tuple[str, str, str], float]:
    found: dict[tuple[str, str, str], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "ipab_api_requests_total":
                found[(sample.labels["method"], sample.labels["route"], sample.labels["status"])] = sample.value
    return found


def test_requests_are_counted_by_route_template_and_status(scraped: TestClient, alice: dict[str, str]) -> None:
    client = scraped
    ref = upload(client, alice)
    assert client.post("/v1/jobs", headers=alice, json={**JOB, "references": [ref]}).status_code == 202
    assert client.post("/v1/jobs", headers=alice, json={**JOB, "references": [ref], "steps": 0}).status_code == 422
    assert client.get("/v1/jobs/nope", headers=alice).status_code == 404
    assert client.get("/v1/jobs/nope").status_code == 401
    assert client.get("/no/such/route").status_code == 404
    seen = counts(client.get("/metrics", headers=SCRAPER).text)
    assert seen[("POST", "/v1/references", "201")] == 1
    assert seen[("POST", "/v1/jobs", "202")] == 1 and seen[("POST", "/v1/jobs", "422")] == 1
    assert seen[("GET", "/v1/jobs/{job_id}", "404")] == 1 and seen[("GET", "/v1/jobs/{job_id}", "401")] == 1
    assert sum(v for (method, route, status), v in seen.items() if status == "404" and "{" not in route) == 1


def test_by_default_the_apis_port_does_not_serve_metrics(client: TestClient, alice: dict[str, str]) -> None:
    for headers in ({}, alice):  # not even to a tenant's key: the labels name every tenant
        r = client.get("/metrics", headers=headers)
        assert_problem(r, 404, "IPAB_API_METRICS_PORT", "IPAB_METRICS_TOKEN")
        assert "ipab_" not in r.text.replace("ipab.dev", "")


def test_with_a_token_only_its_bearer_reads_metrics(scraped: TestClient, alice: dict[str, str]) -> None:
    for headers in ({}, alice, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        r = scraped.get("/metrics", headers=headers)
        assert_problem(r, 401, "IPAB_METRICS_TOKEN")
        assert r.headers["www-authenticate"] == "Bearer"
    r = scraped.get("/metrics", headers=SCRAPER)
    assert r.status_code == 200 and "ipab_api_requests_total" in r.text


def test_a_metrics_port_serves_them_apart_and_the_apis_port_does_not(api_settings: Settings) -> None:
    port = free_port()
    settings = api_settings.model_copy(update={"api_metrics_port": port})
    with TestClient(create_app(settings, dispatcher=False), raise_server_exceptions=False) as client:
        assert client.get("/healthz").status_code == 200
        r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)
        assert r.status_code == 200
        assert counts(r.text)[("GET", "/healthz", "200")] == 1
        assert_problem(client.get("/metrics"), 404, "IPAB_API_METRICS_PORT")
    with pytest.raises(httpx.ConnectError):  # closed with the app
        httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
