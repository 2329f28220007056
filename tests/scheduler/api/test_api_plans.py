"""`/v1/plans` in process on real S3, Redis and SQLite: admin keys only, plans validated as `ipab plans apply`."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from shared.settings import Settings
from tests.scheduler.api.conftest import TOML, assert_problem, plan_toml, put_manifest


def test_an_admin_applies_lists_shows_runs_pauses_resumes_and_deletes_a_plan(
    client: TestClient, admin: dict[str, str], alice: dict[str, str], api_settings: Settings
) -> None:
    text = plan_toml(manifest=put_manifest(api_settings))
    created = client.post("/v1/plans", headers={**admin, **TOML}, content=text)
    assert created.status_code == 201, created.text
    assert (created.json()["change"], created.json()["tenant"]) == ("created", "alice")
    again = client.post("/v1/plans", headers={**admin, **TOML}, content=text)
    assert (again.status_code, again.json()["change"]) == (200, "unchanged")

    [listed] = client.get("/v1/plans", headers=admin).json()
    assert (listed["name"], listed["state"], listed["last_slot"]) == ("nightly", "enabled", None)
    assert listed["next_slot"].endswith(("T02:00:00+01:00", "T02:00:00+02:00"))  # in the plan's zone
    shown = client.get("/v1/plans/nightly", headers=admin).json()
    assert shown["manifest"].startswith("s3://") and shown["source"].startswith("api (key ")

    run = client.post("/v1/plans/nightly/run", headers=admin)
    assert run.status_code == 202, run.text
    assert run.json()["added"] == 2 and run.json()["batch_name"].startswith("nightly@")
    assert run.json()["batch_id"] in [b["id"] for b in client.get("/v1/batches", headers=alice).json()]
    [slot] = client.get("/v1/plans/nightly/history", headers=admin).json()
    assert (slot["kind"], slot["status"], slot["batch_id"], slot["counts"]) == (
        "manual",
        "submitted",
        run.json()["batch_id"],
        {"queued": 2},
    )

    paused = client.post("/v1/plans/nightly/pause", headers=admin).json()
    assert (paused["state"], paused["changed"]) == ("paused", True)
    assert client.post("/v1/plans/nightly/pause", headers=admin).json()["changed"] is False
    assert client.post("/v1/plans/nightly/resume", headers=admin).json()["state"] == "enabled"

    deleted = client.delete("/v1/plans/nightly", headers=admin)
    assert deleted.json() == {"name": "nightly", "deleted_slots": 1}
    assert_problem(client.get("/v1/plans/nightly", headers=admin), 404, "no plan is named 'nightly'")
    assert client.get(f"/v1/batches/{run.json()['batch_id']}", headers=alice).status_code == 200  # its batch stays


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("POST", "/v1/plans"),
        ("GET", "/v1/plans"),
        ("GET", "/v1/plans/nightly"),
        ("GET", "/v1/plans/nightly/history"),
        ("POST", "/v1/plans/nightly/run"),
        ("POST", "/v1/plans/nightly/pause"),
        ("POST", "/v1/plans/nightly/resume"),
        ("DELETE", "/v1/plans/nightly"),
    ],
)
def test_a_tenant_key_gets_403_on_every_plan_route(
    client: TestClient, alice: dict[str, str], admin: dict[str, str], api_settings: Settings, method: str, path: str
) -> None:
    text = plan_toml(manifest=put_manifest(api_settings))
    assert client.post("/v1/plans", headers={**admin, **TOML}, content=text).status_code == 201
    r = client.request(method, path, headers={**alice, **TOML}, content=text if method == "POST" else None)
    assert_problem(r, 403, "needs an admin key", "--admin")
    assert client.get("/v1/plans/nightly", headers=admin).json()["state"] == "enabled"  # nothing changed


BAD_PLANS: dict[str, tuple[str, str]] = {
    "bad cron": ('schedule = "0 25 * * *"\n', "schedule: is '0 25 * * *': is not a cron expression"),
    "unknown timezone": ('timezone = "Europe/Gondor"\n', "timezone: is 'Europe/Gondor': is not a known time zone"),
    "unknown field": ('colour = "red"\n', "colour: is not a plan field"),
    "bad catch_up": ('catch_up = "sometimes"\n', "catch_up: is 'sometimes': must be one of"),
}


@pytest.mark.parametrize("case", list(BAD_PLANS))
def test_a_bad_plan_file_gets_422_naming_the_field_and_changes_nothing(
    client: TestClient, admin: dict[str, str], api_settings: Settings, case: str
) -> None:
    line, reason = BAD_PLANS[case]
    base = {"name": "nightly", "schedule": "0 2 * * *", "manifest": put_manifest(api_settings)}
    key = line.split(" = ")[0]
    text = "".join(f"{k} = {json.dumps(v)}\n" for k, v in base.items() if k != key) + line
    r = client.post("/v1/plans", headers={**admin, **TOML}, content=text)
    assert_problem(r, 422, reason)
    assert any(error["field"] == key for error in r.json()["errors"])
    assert client.get("/v1/plans", headers=admin).json() == []


def test_a_plan_body_that_is_not_toml_is_refused(client: TestClient, admin: dict[str, str]) -> None:
    broken = client.post("/v1/plans", headers={**admin, **TOML}, content="name = ")
    assert_problem(broken, 422, "file", "not valid TOML")
    wrong_type = client.post("/v1/plans", headers={**admin, "content-type": "application/json"}, content="{}")
    assert_problem(wrong_type, 415, "application/toml")


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"manifest": "/etc/hostname"}, "must be an s3:// uri in an allowed reference bucket"),
        ({"manifest": "rows.jsonl"}, "a path would be read from the server's disk"),
        ({"manifest": "s3://some-other-bucket/rows.jsonl"}, "not an allowed one"),
        ({"model_set": "/srv/models/model-set.toml"}, "must be a model set's name"),
    ],
)
def test_a_plan_may_not_point_at_the_servers_disk_or_a_foreign_bucket(
    client: TestClient, admin: dict[str, str], api_settings: Settings, fields: dict[str, str], reason: str
) -> None:
    text = plan_toml(**({"manifest": put_manifest(api_settings)} | fields))
    r = client.post("/v1/plans", headers={**admin, **TOML}, content=text)
    assert_problem(r, 422, reason)
    assert client.get("/v1/plans", headers=admin).json() == []
