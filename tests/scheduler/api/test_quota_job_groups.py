"""POST /v1/jobs written in groups under a tenant's quota: each request is a submission of its own,
so the first that fit go in and only the others get 429 `quota-exceeded`, also when two API
processes write groups at once (SQLite and PostgreSQL)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from scheduler.api.context import ApiContext
from scheduler.api.job_groups import Outcome, write_group
from scheduler.api.problems import ApiProblem
from scheduler.usage.quotas import refusals, set_quotas
from shared.jobs import transaction
from shared.settings import Settings
from tests.scheduler.api.conftest import job_count, job_request, upload


@pytest.fixture
def api_settings(api_settings: Settings, database_url: str) -> Settings:
    """The API tests' settings on SQLite and on PostgreSQL."""
    return api_settings.model_copy(update={"database_url": database_url})


@pytest.fixture
def ctx(api_settings: Settings, client: TestClient) -> Iterator[ApiContext]:
    """An API context on the test's database (built after the app made its tables)."""
    context = ApiContext.build(api_settings)
    yield context
    context.close()


def limit_images(ctx: ApiContext, tenant: str, images_per_day: int) -> None:
    with transaction(ctx.sessions) as session:
        set_quotas(session=session, tenant=tenant, changes={"images_per_day": images_per_day})


def refused_for_the_quota(outcome: Outcome) -> bool:
    """A 429 `quota-exceeded` problem that asks for this request's one image."""
    if not isinstance(outcome, ApiProblem):
        return False
    return (outcome.status, outcome.kind, outcome.extensions.get("requested")) == (429, "quota-exceeded", 1)


def test_a_group_admits_the_requests_that_fit_the_quota_and_refuses_the_others(
    ctx: ApiContext, client: TestClient, alice: dict[str, str], bob: dict[str, str], api_settings: Settings
) -> None:
    limit_images(ctx, "alice", 3)
    ref, bob_ref = upload(client, alice), upload(client, bob, color=(4, 5, 6))
    requests = [job_request("alice", references=[ref], seed=s) for s in range(5)]

    outcomes = write_group(ctx, [*requests, job_request("bob", references=[bob_ref])])

    assert [isinstance(o, str) for o in outcomes] == [True, True, True, False, False, True], outcomes
    assert all(refused_for_the_quota(o) for o in outcomes[3:5]), outcomes
    problem = outcomes[3]
    assert isinstance(problem, ApiProblem)
    assert (problem.extensions["limit"], problem.extensions["used"]) == (3, 3)
    assert job_count(api_settings) == 4
    with transaction(ctx.sessions) as session:  # each refused request is a refusal
        assert refusals(session=session) == [("alice", "images_per_day", 2)]


@pytest.mark.slow
def test_two_api_processes_writing_groups_at_once_never_pass_the_quota(
    ctx: ApiContext, client: TestClient, alice: dict[str, str], api_settings: Settings
) -> None:
    """Two contexts (two engines: two processes) each write a group of 8 requests at once under a
    quota of 10: exactly 10 go in, whichever group goes first."""
    limit_images(ctx, "alice", 10)
    ref = upload(client, alice)
    contexts = [ApiContext.build(api_settings), ApiContext.build(api_settings)]
    results: list[list[Any]] = [[], []]
    gate = threading.Barrier(2)

    def write(i: int) -> None:
        requests = [job_request("alice", references=[ref], seed=100 * i + s) for s in range(8)]
        gate.wait()
        results[i] = list(write_group(contexts[i], requests))

    try:
        threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        for context in contexts:
            context.close()
    outcomes = results[0] + results[1]
    assert sum(isinstance(o, str) for o in outcomes) == 10, outcomes
    assert all(isinstance(o, str) or refused_for_the_quota(o) for o in outcomes), outcomes
    assert job_count(api_settings) == 10
