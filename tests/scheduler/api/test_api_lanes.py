"""Lanes, pause and policy positions over HTTP: single jobs are interactive, batches bulk, tenants held to lanes."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import select, update

from shared.db import Job, Tenant, make_engine, make_session_factory
from shared.settings import Settings
from tests.scheduler.api.conftest import JOB, assert_problem, upload


def lanes(settings: Settings) -> dict[str, str]:
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            return {job_id: lane for job_id, lane in session.execute(select(Job.id, Job.lane))}
    finally:
        engine.dispose()


def test_a_single_job_is_interactive_and_jumps_a_bulk_batch(
    client: TestClient, alice: dict[str, str], api_settings: Settings
) -> None:
    ref = upload(client, alice)
    rows = "".join(f'{{"references": ["{ref}"], "prompt": "row {i}", "seed": {i}}}\n' for i in range(30))
    batch = client.post("/v1/batches", headers={**alice, "Content-Type": "application/jsonl"}, content=rows)
    assert batch.status_code == 202, batch.text
    job = client.post("/v1/jobs", headers=alice, json={**JOB, "references": [ref]})
    assert job.status_code == 202, job.text

    shown = client.get(f"/v1/jobs/{job.json()['id']}", headers=alice).json()
    assert shown["lane"] == "interactive"
    assert shown["queue_position"] == 0  # submitted last, starts first
    batch_view = client.get(f"/v1/batches/{batch.json()['id']}", headers=alice).json()
    assert batch_view["queue_position"] == 30  # its last job waits for the interactive one and 29 of its own
    assert sorted(lanes(api_settings).values()) == ["bulk"] * 30 + ["interactive"]


def test_a_batch_or_a_row_may_name_its_lane_and_a_bad_lane_is_named(
    client: TestClient, alice: dict[str, str], api_settings: Settings
) -> None:
    ref = upload(client, alice)
    rows = f'{{"references": ["{ref}"], "prompt": "a"}}\n{{"references": ["{ref}"], "prompt": "b", "lane": "bulk"}}\n'
    r = client.post("/v1/batches?lane=scheduled", headers={**alice, "Content-Type": "application/jsonl"}, content=rows)
    assert r.status_code == 202, r.text
    assert sorted(lanes(api_settings).values()) == ["bulk", "scheduled"]
    bad = client.post("/v1/jobs", headers=alice, json={**JOB, "references": [ref], "lane": "express"})
    assert_problem(bad, 422, "lane", "express")


def test_a_tenant_held_to_some_lanes_is_refused_the_others(
    client: TestClient, alice: dict[str, str], api_settings: Settings
) -> None:
    ref = upload(client, alice)
    engine = make_engine(api_settings.database_url)
    with make_session_factory(engine).begin() as session:
        session.execute(update(Tenant).where(Tenant.name == "alice").values(lanes="bulk"))
    engine.dispose()
    refused = client.post("/v1/jobs", headers=alice, json={**JOB, "references": [ref]})
    assert_problem(refused, 422, "lane", "interactive", "bulk")
    allowed = client.post("/v1/jobs", headers=alice, json={**JOB, "references": [ref], "lane": "bulk"})
    assert allowed.status_code == 202, allowed.text


def test_pause_and_resume_a_batch_and_another_tenant_cannot(
    client: TestClient, alice: dict[str, str], bob: dict[str, str]
) -> None:
    ref = upload(client, alice)
    rows = f'{{"references": ["{ref}"], "prompt": "a"}}\n'
    batch_id = client.post("/v1/batches", headers={**alice, "Content-Type": "application/jsonl"}, content=rows).json()[
        "id"
    ]
    paused = client.post(f"/v1/batches/{batch_id}/pause", headers=alice)
    assert paused.status_code == 200 and paused.json()["paused"] is True
    assert client.get(f"/v1/batches/{batch_id}", headers=alice).json()["paused"] is True
    assert_problem(client.post(f"/v1/batches/{batch_id}/resume", headers=bob), 404, "batch")
    resumed = client.post(f"/v1/batches/{batch_id}/resume", headers=alice)
    assert resumed.status_code == 200 and resumed.json()["paused"] is False


def test_a_running_job_shows_its_denoising_step(
    client: TestClient, alice: dict[str, str], api_settings: Settings
) -> None:
    import redis

    from shared.step_progress import record_steps

    ref = upload(client, alice)
    job_id = client.post("/v1/jobs", headers=alice, json={**JOB, "references": [ref]}).json()["id"]
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["progress"] is None  # queued
    engine = make_engine(api_settings.database_url)
    with make_session_factory(engine).begin() as session:
        session.execute(update(Job).where(Job.id == job_id).values(status="running"))
    engine.dispose()
    record_steps(
        redis.Redis.from_url(api_settings.redis_url),
        prefix=api_settings.redis_prefix,
        steps={job_id: (3, 8)},
        ttl_s=60,
    )
    assert client.get(f"/v1/jobs/{job_id}", headers=alice).json()["progress"] == {"step": 3, "steps": 8}
