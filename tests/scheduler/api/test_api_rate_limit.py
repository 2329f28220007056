"""Per-tenant request rate limits (a token bucket in a real Redis): a tenant past its burst gets
429 with Retry-After, another tenant is served as if alone, and a Redis outage refuses nobody."""

from __future__ import annotations

import json
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any, Final

import httpx
import pytest
from fastapi.testclient import TestClient

from devkit import services
from devkit.flood import Flood
from scheduler.api.app import create_app
from scheduler.api.rate_limit import REFUSAL_SPREAD_S, ROUTE_COSTS, refusal_delay_s
from shared.settings import Settings
from tests.scheduler.api.conftest import JOB, assert_problem, png_bytes, upload
from tests.scheduler.api.served import ServedApi

JSONL: Final = {"content-type": "application/jsonl"}
GALLERY: Final = "/v1/batches/{batch_id}/gallery"


@pytest.fixture
def limited(api_settings: Settings) -> Callable[..., TestClient]:
    """`limited(rate, burst)`: a TestClient on an app whose tenants get `rate` requests/s, `burst` at once."""
    clients: list[TestClient] = []

    def make(rate: float, burst: int, **updates: Any) -> TestClient:
        settings = api_settings.model_copy(update={"api_rate_per_s": rate, "api_rate_burst": burst, **updates})
        client = TestClient(create_app(settings, dispatcher=False), raise_server_exceptions=False)
        clients.append(client.__enter__())
        return client

    yield make  # type: ignore[misc]
    for client in clients:
        client.__exit__(None, None, None)


def test_a_tenant_past_its_burst_gets_429_with_retry_after_while_another_is_served(
    limited: Callable[..., TestClient], alice: dict[str, str], bob: dict[str, str]
) -> None:
    client = limited(0.5, 5)
    answers = [client.get("/v1/batches", headers=alice) for _ in range(7)]
    assert [r.status_code for r in answers] == [200] * 5 + [429] * 2
    refused = answers[-1]
    assert_problem(refused, 429, "alice", "0.5 request(s)/s", "burst of 5", "IPAB_API_RATE_PER_S")
    assert refused.json()["type"].endswith("/rate-limited")
    assert 1 <= int(refused.headers["retry-after"]) <= 2
    assert [client.get("/v1/batches", headers=bob).status_code for _ in range(5)] == [200] * 5
    assert client.get("/v1/batches").status_code == 401  # no key: refused before any bucket is touched
    assert client.get("/healthz").status_code == 200  # no key needed, no limit


def test_tokens_come_back_at_the_rate(limited: Callable[..., TestClient], alice: dict[str, str]) -> None:
    # A token every 2 s: the three requests come well within one refill even on a loaded machine.
    client = limited(0.5, 2)
    assert [client.get("/v1/batches", headers=alice).status_code for _ in range(3)] == [200, 200, 429]
    time.sleep(2.2)  # 1.1 tokens at 0.5/s since the refusal
    assert client.get("/v1/batches", headers=alice).status_code == 200


def test_the_gallery_and_results_cost_more_than_one_request(
    limited: Callable[..., TestClient], alice: dict[str, str]
) -> None:
    cost = ROUTE_COSTS["GET " + GALLERY]
    assert cost > 1 and ROUTE_COSTS["GET /v1/batches/{batch_id}/results"] > 1
    spent = ROUTE_COSTS["POST /v1/references"] + ROUTE_COSTS["POST /v1/batches"]
    client = limited(0.01, 2 * cost + spent)
    ref = upload(client, alice)
    batch = client.post("/v1/batches", headers={**alice, **JSONL}, content=json.dumps({**JOB, "references": [ref]}))
    assert batch.status_code == 202  # `spent` tokens so far
    gallery = f"/v1/batches/{batch.json()['id']}/gallery"
    assert [client.get(gallery, headers=alice).status_code for _ in range(3)] == [200, 200, 429]


def test_uploads_and_submissions_cost_what_they_cost_the_server(
    limited: Callable[..., TestClient], alice: dict[str, str]
) -> None:
    """An upload refused from its header (an image bomb) costs as many tokens as any upload: with a
    burst of 10, three uploads and one lookup, not ten uploads."""
    assert ROUTE_COSTS["POST /v1/references"] == 3 and ROUTE_COSTS["POST /v1/jobs"] == 2
    client = limited(0.01, 10)
    image = {"file": ("b.png", png_bytes(size=8), "image/png")}
    answers = [client.post("/v1/references", headers=alice, files=image).status_code for _ in range(4)]
    assert answers == [201, 201, 201, 429]
    assert client.get("/v1/batches", headers=alice).status_code == 200  # the tenth token
    refused = client.get("/v1/batches", headers=alice)
    assert_problem(refused, 429, "this request costs 1 token")


def test_every_priced_route_exists(client: TestClient) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for route in ROUTE_COSTS:
        method, path = route.split(" ", 1)
        assert method.lower() in paths.get(path, {}), route


def test_a_redis_outage_refuses_nobody(
    api_settings: Settings, alice: dict[str, str], bob: dict[str, str], private_redis: services.Service
) -> None:
    settings = api_settings.model_copy(
        update={"redis_url": private_redis.url, "api_rate_per_s": 0.01, "api_rate_burst": 2}
    )
    with TestClient(create_app(settings, dispatcher=False), raise_server_exceptions=False) as client:
        assert [client.get("/v1/batches", headers=alice).status_code for _ in range(3)] == [200, 200, 429]
        private_redis.stop()
        t0 = time.perf_counter()
        assert [client.get("/v1/batches", headers=bob).status_code for _ in range(5)] == [200] * 5  # past his burst
        assert time.perf_counter() - t0 < 5  # no request waits out a timeout each
        assert client.get("/v1/batches", headers=alice).status_code == 429  # her tokens are not back: still known


def test_made_up_keys_are_looked_up_at_the_clients_lookup_rate_and_known_keys_stay_served(
    api_settings: Settings, alice: dict[str, str], bob: dict[str, str]
) -> None:
    """Each unknown key costs a SQL lookup: a client address gets IPAB_API_KEY_LOOKUP_BURST of them,
    then 429 at once, without a lookup; a key already known is served from the cache, and another
    address has its own bucket. Lookups that find a valid key use up nothing (tenants behind a NAT)."""
    settings = api_settings.model_copy(update={"api_key_lookups_per_s": 0.01, "api_key_lookup_burst": 5})
    app = create_app(settings, dispatcher=False)
    guess = {"Authorization": "Bearer ipab_" + "x" * 43}
    with TestClient(app, raise_server_exceptions=False, client=("192.0.2.7", 5000)) as hostile:
        assert hostile.get("/v1/batches", headers=alice).status_code == 200  # her key: one lookup, given back
        answers = [hostile.get("/v1/batches", headers=guess) for _ in range(7)]
        assert [r.status_code for r in answers] == [401] * 5 + [429] * 2
        assert_problem(answers[-1], 429, "client 192.0.2.7", "IPAB_API_KEY_LOOKUPS_PER_S", "IPAB_API_KEY_LOOKUP_BURST")
        assert int(answers[-1].headers["retry-after"]) >= 1
        assert hostile.get("/v1/batches", headers=alice).status_code == 200  # known: no lookup needed
        app.state.ctx.callers.clear()  # as AUTH_CACHE_S after: looked up again, but as a key found valid before
        assert hostile.get("/v1/batches", headers=alice).status_code == 200
        assert hostile.get("/v1/batches", headers=bob).status_code == 429  # not known yet: waits with the address
    with TestClient(create_app(settings, dispatcher=False), client=("198.51.100.3", 5000)) as other:
        assert other.get("/v1/batches", headers=bob).status_code == 200
        assert other.get("/v1/batches", headers=guess).status_code == 401


def test_the_limit_is_off_at_rate_zero(limited: Callable[..., TestClient], alice: dict[str, str]) -> None:
    client = limited(0, 1)
    assert [client.get("/v1/batches", headers=alice).status_code for _ in range(5)] == [200] * 5


def calm_latencies(url: str, headers: dict[str, str], job_id: str, count: int) -> list[float]:
    latencies = []
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        for _ in range(count):
            t0 = time.perf_counter()
            assert client.get(f"/v1/jobs/{job_id}").status_code == 200
            latencies.append(time.perf_counter() - t0)
    return latencies


def test_a_flooding_tenant_is_refused_and_the_other_is_served_about_as_fast_as_alone(
    serve: Callable[..., ServedApi], alice: dict[str, str], bob: dict[str, str]
) -> None:
    """Alice floods her gallery from 16 connections of another process, ignoring Retry-After; bob's
    GETs, measured alone and beside the flood in turns, all succeed and keep about their speed."""
    server = serve()  # the default limits
    files = {"file": ("a.png", png_bytes(), "image/png")}
    refs = {
        who: httpx.post(server.url + "/v1/references", headers=h, files=files).json()["id"]
        for who, h in (("alice", alice), ("bob", bob))
    }
    rows = "\n".join(json.dumps({**JOB, "references": [refs["alice"]], "seed": i}) for i in range(20))
    batch = httpx.post(server.url + "/v1/batches", headers={**alice, **JSONL}, content=rows, timeout=60).json()["id"]
    job = httpx.post(server.url + "/v1/jobs", headers=bob, json={**JOB, "references": [refs["bob"]]}).json()["id"]
    alone: list[float] = []
    beside: list[float] = []
    flood = Flood(server.url, alice, f"/v1/batches/{batch}/gallery").start()
    try:
        for _ in range(3):
            alone += calm_latencies(server.url, bob, job, 40)
            flood.resume()
            beside += calm_latencies(server.url, bob, job, 40)
            flood.pause()
    finally:
        statuses = flood.stop()
    assert statuses.get(429, 0) > 2 * statuses.get(200, 0) > 0, statuses
    alone_ms, beside_ms = 1000 * statistics.median(alone), 1000 * statistics.median(beside)
    assert beside_ms < 3 * alone_ms + 20, (alone_ms, beside_ms)


@pytest.mark.parametrize(("wait_s", "delay_s"), [(0.01, 0.5), (0.7, 0.7), (30.0, 1.0)])
def test_a_refusal_is_answered_after_its_wait_within_bounds(wait_s: float, delay_s: float) -> None:
    """A client ignoring Retry-After gets at most two refusals a second per connection, even when its
    tokens are due back in a moment, and never waits more than a second and a spread for one."""
    assert refusal_delay_s(wait_s, spread=0.0) == delay_s
    assert refusal_delay_s(wait_s, spread=1.0) == delay_s + REFUSAL_SPREAD_S
    assert delay_s <= refusal_delay_s(wait_s) <= delay_s + REFUSAL_SPREAD_S


def test_refusals_that_come_due_together_are_answered_spread_out(
    serve: Callable[..., ServedApi], alice: dict[str, str]
) -> None:
    """16 connections past the tenant's burst at once, all waiting for the same tokens, are not answered
    in one burst of the event loop (which another tenant's request arriving then would wait out) but
    spread over REFUSAL_SPREAD_S; and the flood's next requests arrive spread the same way."""
    server = serve(api_rate_per_s=0.2, api_rate_burst=1)
    assert httpx.get(server.url + "/v1/batches", headers=alice).status_code == 200  # the one token
    answered: list[float] = []

    def ask() -> None:
        with httpx.Client(base_url=server.url, headers=alice, timeout=30) as client:
            assert client.get("/healthz").status_code == 200  # connected (no key, no limit): the GETs go at once
            together.wait()
            status = client.get("/v1/batches").status_code
            answered.append(time.monotonic())
            assert status == 429

    together = threading.Barrier(16)
    threads = [threading.Thread(target=ask) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(answered) == 16
    # Without the spread all 16 came within a few ms of each other (the same wake-up).
    assert max(answered) - min(answered) > 0.2 * REFUSAL_SPREAD_S, sorted(answered)
