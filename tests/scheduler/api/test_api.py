"""The HTTP API in process (TestClient) on real Redis, S3 and SQLite: keys, isolation, idempotency, limits."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest
from fastapi.testclient import TestClient

from ipab.cli import main
from scheduler.api.app import create_app
from scheduler.api.caches import AUTH_CACHE_S
from shared.settings import Settings
from tests.scheduler.api.conftest import JOB, assert_problem, job_count, upload


def test_keys_create_prints_the_key_alone_on_its_last_line_once_and_revoke_stops_it_within_the_auth_cache(
    api_settings: Settings,
    settings_env: Callable[[Settings], dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    client: TestClient,
) -> None:
    assert AUTH_CACHE_S <= 10  # the bound the README promises
    callers = client.app.state.ctx.callers  # type: ignore[attr-defined]
    # The cache's own clock, moved by the test: the commands below may take seconds on a loaded
    # machine (a 3 s cache on the real clock once lapsed before the revoked key's second request).
    now_s = [0.0]
    monkeypatch.setattr(callers, "_clock", lambda: now_s[0])
    for name, value in settings_env(api_settings).items():
        monkeypatch.setenv(name, value)
    assert main(["keys", "create", "--tenant", "carol"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    key = out[-1]
    assert key.startswith("ipab_") and len(key) >= 5 + 43  # 32 random bytes, url-safe base64
    assert any("whsec_" in line for line in out)  # the tenant's webhook secret, shown with its first key
    assert main(["keys", "create", "--tenant", "carol", "--admin"]) == 0
    assert "whsec_" not in capsys.readouterr().out  # shown once, when the tenant is created
    headers = {"Authorization": f"Bearer {key}"}
    assert client.get("/v1/batches", headers=headers).status_code == 200
    assert main(["keys", "list"]) == 0
    listing = capsys.readouterr().out
    assert key not in listing and "carol" in listing
    key_id = out[0].split()[2]
    assert main(["keys", "revoke", key_id]) == 0
    now_s[0] += callers.ttl_s - 0.5
    assert client.get("/v1/batches", headers=headers).status_code == 200  # cached: still valid for a moment
    now_s[0] += 0.5
    assert_problem(client.get("/v1/batches", headers=headers), 401, "revoked")


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Basic abc"}, {"Authorization": "Bearer nope"}, {"Authorization": "Bearer "}],
)
def test_every_v1_route_needs_a_valid_bearer_key(client: TestClient, headers: dict[str, str]) -> None:
    assert_problem(client.get("/v1/batches", headers=headers), 401, "authorization" if not headers else "")
    assert_problem(client.post("/v1/jobs", headers=headers, json=JOB), 401)
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json()["status"] == "ready"


def test_a_tenant_never_sees_another_tenants_things(
    client: TestClient, alice: dict[str, str], bob: dict[str, str]
) -> None:
    ref = upload(client, alice)
    job = client.post("/v1/jobs", headers=alice, json={**JOB, "references": [ref]}).json()["id"]
    body = f'{{"references": ["{ref}"], "prompt": "x", "steps": 2}}'
    batch = client.post("/v1/batches", headers={**alice, "content-type": "application/jsonl"}, content=body).json()[
        "id"
    ]
    for method, path in [
        ("GET", f"/v1/references/{ref}"),
        ("GET", f"/v1/jobs/{job}"),
        ("GET", f"/v1/jobs/{job}/image"),
        ("POST", f"/v1/jobs/{job}/cancel"),
        ("GET", f"/v1/batches/{batch}"),
        ("GET", f"/v1/batches/{batch}/results"),
        ("POST", f"/v1/batches/{batch}/cancel"),
        ("POST", f"/v1/batches/{batch}/retry"),
    ]:
        theirs = client.request(method, path, headers=bob)
        missing = client.request(
            method, path.replace(job, "0" * 8).replace(batch, "0" * 8).replace(ref, "0" * 64), headers=bob
        )
        assert_problem(theirs, 404, "no ")
        assert theirs.json()["detail"].split(" has id")[0] == missing.json()["detail"].split(" has id")[0]
    # Bob cannot use Alice's reference either: to him it does not exist.
    r = client.post("/v1/jobs", headers=bob, json={**JOB, "references": [ref]})
    assert_problem(r, 422, "references", "no reference has this id")
    assert client.get("/v1/batches", headers=bob).json() == []
    view = client.get(f"/v1/jobs/{job}", headers=alice).json()
    assert view["status"] == "queued" and "render_batch_size" not in view  # a fleet figure: the operator's alone


def test_a_replayed_post_returns_the_first_response_and_creates_nothing(
    client: TestClient, alice: dict[str, str], bob: dict[str, str], api_settings: Settings
) -> None:
    ref = upload(client, alice)
    headers = {**alice, "Idempotency-Key": "k-1"}
    first = client.post("/v1/jobs", headers=headers, json={**JOB, "references": [ref]})
    again = client.post("/v1/jobs", headers=headers, json={"references": [ref], **JOB})  # same body, keys reordered
    assert first.status_code == again.status_code == 202
    assert first.json() == again.json() and again.headers["idempotent-replayed"] == "true"
    assert job_count(api_settings) == 1
    other = client.post("/v1/jobs", headers=headers, json={**JOB, "references": [ref], "seed": 8})
    assert_problem(other, 422, "idempotency-key", "another request")
    # Keys are per tenant: Bob's "k-1" is his own.
    bob_ref = upload(client, bob)
    r = client.post("/v1/jobs", headers={**bob, "Idempotency-Key": "k-1"}, json={**JOB, "references": [bob_ref]})
    assert r.status_code == 202 and r.json()["id"] != first.json()["id"]
    assert job_count(api_settings) == 2


def test_two_racing_posts_with_one_key_create_one_job(
    api_settings: Settings, alice: dict[str, str], client: TestClient
) -> None:
    ref = upload(client, alice)
    headers = {**alice, "Idempotency-Key": "race"}
    results: list[Any] = []
    start = threading.Barrier(4)

    def post() -> None:
        start.wait()
        results.append(client.post("/v1/jobs", headers=headers, json={**JOB, "references": [ref]}))

    threads = [threading.Thread(target=post) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results] == [202] * 4, [r.text for r in results]
    assert len({r.json()["id"] for r in results}) == 1
    assert job_count(api_settings) == 1


def test_a_tenant_past_its_queued_cap_gets_429_with_retry_after(api_settings: Settings, alice: dict[str, str]) -> None:
    capped = api_settings.model_copy(update={"api_max_queued_jobs": 2})
    with TestClient(create_app(capped, dispatcher=False), raise_server_exceptions=False) as client:
        ref = upload(client, alice)
        for seed in (1, 2):
            assert (
                client.post("/v1/jobs", headers=alice, json={**JOB, "references": [ref], "seed": seed}).status_code
                == 202
            )
        r = client.post("/v1/jobs", headers=alice, json={**JOB, "references": [ref], "seed": 3})
        assert_problem(r, 429, "cap of 2")
        assert int(r.headers["retry-after"]) > 0


def test_a_batch_reports_every_bad_row_and_submits_nothing_unless_told(
    client: TestClient, alice: dict[str, str], api_settings: Settings
) -> None:
    ref = upload(client, alice)
    rows = [
        {"references": [ref], "prompt": "ok", "steps": 2},
        {"references": [ref], "prompt": "bad", "steps": 0},
        {"references": ["f" * 64], "prompt": "unknown ref"},
        {"references": [ref], "prompt": "fine too"},
    ]
    import json

    body = "\n".join(json.dumps(r) for r in rows)
    jsonl = {**alice, "content-type": "application/jsonl"}
    r = client.post("/v1/batches", headers=jsonl, content=body)
    assert_problem(r, 422, "line 2: steps", "line 3: references")
    assert job_count(api_settings) == 0
    r = client.post("/v1/batches?skip_invalid=true", headers=jsonl, content=body)
    assert r.status_code == 202 and r.json()["added"] == 2
    assert [p["line"] for p in r.json()["invalid"]] == [2, 3]
    results = client.get(f"/v1/batches/{r.json()['id']}/results?status=queued", headers=alice).text.splitlines()
    assert [json.loads(line)["prompt"] for line in results] == ["ok", "fine too"]
