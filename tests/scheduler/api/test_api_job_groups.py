"""POST /v1/jobs written in groups: each request keeps its own answer (real Redis, S3 and SQLite)."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from scheduler.api.context import ApiContext
from scheduler.api.job_groups import write_group
from scheduler.api.problems import ApiProblem
from scheduler.api.submission import (
    StoredReferenceResolver,
    api_batch_name,
    parse_api_rows,
    reference_file,
    tenant_references,
)
from scheduler.batches.events import JOB_EVENTS
from scheduler.submission.submit import RowOptions, submit_rows
from shared.db import Batch, Job, WebhookSubscription, new_id, utcnow
from shared.jobs import transaction
from shared.settings import Settings
from tests.scheduler.api.conftest import JOB, assert_problem, job_count, job_request, make_key, upload

HOOK = ("http://127.0.0.1:9/hook", [JOB_EVENTS["succeeded"]])


@pytest.fixture
def ctx(api_settings: Settings) -> Iterator[ApiContext]:
    context = ApiContext.build(api_settings)
    yield context
    context.close()


def jobs_of(ctx: ApiContext, tenant: str) -> list[Job]:
    with transaction(ctx.sessions) as session:
        stmt = select(Job).join(Batch, Batch.id == Job.batch_id).where(Batch.name == api_batch_name(tenant))
        return list(session.scalars(stmt))


def test_one_group_gives_each_request_its_own_answer(ctx: ApiContext, client: TestClient, alice: Any) -> None:
    ref = upload(client, alice)
    bob_ref = upload(client, alice, color=(9, 9, 9))  # alice's: bob may not use it
    requests = [
        job_request("alice", references=[ref], seed=1),
        job_request("alice", references=["e" * 64], seed=2),  # unknown reference
        job_request("alice", HOOK, references=[ref], seed=3),
        job_request("alice", references=[ref], seed=4, id="mine"),
        job_request("alice", references=[ref], seed=5, id="mine"),  # the same id in the same group
        job_request("bob", references=[bob_ref], seed=6),  # another tenant's reference
        job_request("bob", references=[ref], seed=1),
    ]
    # bob has not uploaded `ref` either: both of his rows name alice's images.
    outcomes = write_group(ctx, requests)
    created = [o for o in outcomes if isinstance(o, str)]
    assert [isinstance(o, str) for o in outcomes] == [True, False, True, True, False, False, False]
    assert isinstance(outcomes[1], ApiProblem) and outcomes[1].status == 422
    assert "references" in outcomes[1].detail and "upload" in outcomes[1].detail
    assert isinstance(outcomes[4], ApiProblem) and outcomes[4].status == 409
    assert str(outcomes[3]) in outcomes[4].detail  # names the job that has the id
    assert all(isinstance(o, ApiProblem) and o.status == 422 for o in outcomes[5:])
    jobs = {job.id: job for job in jobs_of(ctx, "alice")}
    assert set(jobs) == set(created)
    assert {jobs[str(outcomes[0])].seed, jobs[str(outcomes[2])].seed, jobs[str(outcomes[3])].seed} == {1, 3, 4}
    assert {job.line for job in jobs.values()} == {1}  # a single API job is line 1, whatever its group
    assert jobs_of(ctx, "bob") == []
    with transaction(ctx.sessions) as session:
        hooks = list(session.scalars(select(WebhookSubscription)))
    assert [(h.subject_id, h.url) for h in hooks] == [(outcomes[2], HOOK[0])]


def test_the_cap_admits_requests_in_order_and_refuses_the_rest_with_429(api_settings: Settings, client: Any) -> None:
    capped = ApiContext.build(api_settings.model_copy(update={"api_max_queued_jobs": 3}))
    try:
        key, _ = make_key(api_settings, "alice")
        ref = upload(client, {"Authorization": f"Bearer {key}"})
        outcomes = write_group(capped, [job_request("alice", references=[ref], seed=s) for s in range(5)])
        assert [isinstance(o, str) for o in outcomes] == [True, True, True, False, False]
        assert all(isinstance(o, ApiProblem) and o.status == 429 and "cap of 3" in o.detail for o in outcomes[3:])
        assert len(jobs_of(capped, "alice")) == 3
    finally:
        capped.close()


def test_a_tenant_whose_batch_is_unusable_fails_alone(ctx: ApiContext, client: TestClient, alice: Any) -> None:
    ref = upload(client, alice)
    with transaction(ctx.sessions) as session:  # alice's API batch runs on another model set
        session.add(Batch(id=new_id(), name=api_batch_name("alice"), model_set="other", created_at=utcnow()))
    bob_key, _ = make_key(ctx.settings, "bob")
    bob_ref = upload(client, {"Authorization": f"Bearer {bob_key}"}, color=(5, 6, 7))
    outcomes = write_group(ctx, [job_request("alice", references=[ref]), job_request("bob", references=[bob_ref])])
    assert isinstance(outcomes[0], ApiProblem) and outcomes[0].status == 422 and "other" in outcomes[0].detail
    assert isinstance(outcomes[1], str) and [job.id for job in jobs_of(ctx, "bob")] == [outcomes[1]]


def test_concurrent_posts_each_get_their_own_answer(client: TestClient, alice: Any, api_settings: Settings) -> None:
    ref = upload(client, alice)
    bodies: list[dict[str, Any]] = [{**JOB, "references": [ref], "seed": s} for s in range(20)]
    bodies += [{**JOB, "references": ["d" * 64], "seed": 99}] * 3  # unknown reference
    bodies += [{**JOB, "references": [ref], "id": "twice"}] * 2
    bodies += [{**JOB, "references": [ref], "steps": 0}]  # invalid parameter
    results: list[Any] = [None] * len(bodies)
    start = threading.Barrier(len(bodies))

    def post(i: int) -> None:
        start.wait()
        results[i] = client.post("/v1/jobs", headers=alice, json=bodies[i])

    threads = [threading.Thread(target=post, args=(i,)) for i in range(len(bodies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [r.status_code for r in results[:20]] == [202] * 20, [r.text for r in results[:20]]
    for r in results[20:23]:
        assert_problem(r, 422, "references", "POST /v1/references")
    assert sorted(r.status_code for r in results[23:25]) == [202, 409]
    assert_problem(results[25], 422, "steps")
    ids = [r.json()["id"] for r in results if r.status_code == 202]
    assert len(set(ids)) == 21 == job_count(api_settings)
    for job_id, body in zip(ids[:20], bodies[:20], strict=True):
        got = client.get(f"/v1/jobs/{job_id}", headers=alice).json()
        assert (got["status"], got["params"]["seed"]) == ("queued", body["seed"])


def test_identical_posts_without_an_id_are_two_jobs_and_a_reused_id_is_409(
    client: TestClient, alice: Any, api_settings: Settings
) -> None:
    ref = upload(client, alice)
    unseeded = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "references": [ref]}
    first, second = (client.post("/v1/jobs", headers=alice, json=unseeded) for _ in range(2))
    assert first.status_code == second.status_code == 202
    assert first.json()["id"] != second.json()["id"]
    seeded = {**unseeded, "seed": 3}  # the same image, asked for twice: two jobs too
    assert client.post("/v1/jobs", headers=alice, json=seeded).status_code == 202
    assert client.post("/v1/jobs", headers=alice, json=seeded).status_code == 202
    named = client.post("/v1/jobs", headers=alice, json={**seeded, "id": "cat-1"})
    again = client.post("/v1/jobs", headers=alice, json={**seeded, "id": "cat-1", "seed": 4})
    assert named.status_code == 202
    assert_problem(again, 409, "id", "cat-1", named.json()["id"])
    assert job_count(api_settings) == 5


def test_rows_of_other_submissions_keep_their_content_keys(ctx: ApiContext, client: TestClient, alice: Any) -> None:
    """Only single API jobs get a key of their own: a batch's identical rows are still one job each time."""
    ref = upload(client, alice)
    rows = [(1, {**JOB, "references": [ref]}), (2, {**JOB, "references": [ref]})]
    body = "\n".join(json.dumps(row) for _, row in rows)
    r = client.post("/v1/batches", headers={**alice, "content-type": "application/jsonl"}, content=body)
    assert r.status_code == 202 and r.json()["added"] == 2  # the n-th copy of a row is its own job
    with transaction(ctx.sessions) as session:
        batch = session.get(Batch, r.json()["id"])
        assert batch is not None
        images = tenant_references(session=session, tenant="alice", ids=[ref])
    again = submit_rows(
        settings=ctx.settings,
        sessions=ctx.sessions,
        parsed=parse_api_rows(rows),
        resolver=StoredReferenceResolver(ctx=ctx, known={ref: reference_file(ctx, images[ref])}),
        batch_name=batch.name,
        model_set=ctx.model_set(),
        options=RowOptions(tenant="alice"),
    )
    assert (again.added, again.skipped_existing) == (0, 2)
