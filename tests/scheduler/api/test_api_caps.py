"""A tenant's queued-jobs cap holds under concurrency: the count and the insert happen in one
transaction under the tenant's lock, on SQLite and PostgreSQL, across API processes."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from typing import Final

import httpx
import pytest
from sqlalchemy import func, select

from scheduler.api.context import ApiContext
from scheduler.api.job_groups import write_group
from scheduler.api.problems import ApiProblem
from shared.db import Batch, Job, JobStatus, make_engine, make_session_factory
from shared.settings import Settings
from tests.scheduler.api.conftest import JOB, job_request, make_key, png_bytes
from tests.scheduler.api.served import ServedApi

CAP: Final = 10
JSONL: Final = {"content-type": "application/jsonl"}


def queued(settings: Settings, tenant: str) -> int:
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            stmt = (
                select(func.count())
                .select_from(Job)
                .join(Batch, Batch.id == Job.batch_id)
                .where(Batch.tenant == tenant, Job.status == JobStatus.queued.value)
            )
            return int(session.scalar(stmt) or 0)
    finally:
        engine.dispose()


def at_once(calls: list[Callable[[], httpx.Response]]) -> list[httpx.Response]:
    """Run `calls` in threads released together; their responses in order."""
    gate = threading.Barrier(len(calls))
    results: list[httpx.Response | None] = [None] * len(calls)

    def run(i: int) -> None:
        gate.wait()
        results[i] = calls[i]()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r is not None for r in results)
    return [r for r in results if r is not None]


@pytest.fixture
def capped(api_settings: Settings, database_url: str) -> Settings:
    """The API's settings on SQLite or PostgreSQL, with a cap of CAP queued jobs per tenant."""
    return api_settings.model_copy(update={"database_url": database_url, "api_max_queued_jobs": CAP})


def same_database(settings: Settings) -> dict[str, object]:
    """The updates that make `serve` start an API on `settings`' database and cap."""
    return {"database_url": settings.database_url, "api_max_queued_jobs": settings.api_max_queued_jobs}


def upload(url: str, headers: dict[str, str]) -> str:
    r = httpx.post(url + "/v1/references", headers=headers, files={"file": ("a.png", png_bytes(), "image/png")})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def assert_refused_for_the_cap(r: httpx.Response) -> None:
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) > 0
    assert r.json()["type"].endswith("/queue-full")
    assert f"cap of {CAP}" in r.json()["detail"] and "IPAB_API_MAX_QUEUED_JOBS" in r.json()["detail"]


def test_concurrent_batches_never_pass_the_cap(capped: Settings, serve: Callable[..., ServedApi]) -> None:
    key, _ = make_key(capped, "alice")
    alice = {"Authorization": f"Bearer {key}"}
    servers = [serve(**same_database(capped)), serve(**same_database(capped))]  # two API processes
    ref = upload(servers[0].url, alice)

    def post(i: int) -> Callable[[], httpx.Response]:
        rows = "\n".join(json.dumps({**JOB, "references": [ref], "prompt": f"b{i} r{r}"}) for r in range(CAP))
        url = servers[i % 2].url + "/v1/batches"
        return lambda: httpx.post(url, headers={**alice, **JSONL}, content=rows, timeout=60)

    answers = at_once([post(i) for i in range(8)])
    assert [r.status_code for r in answers].count(202) == 1, [r.text for r in answers]
    for r in answers:
        if r.status_code != 202 and not r.json()["type"].endswith("/busy"):  # one batch per tenant per process
            assert_refused_for_the_cap(r)
            assert f"has {CAP} queued" in r.json()["detail"] and f"adding {CAP}" in r.json()["detail"]
    assert queued(capped, "alice") == CAP


def test_concurrent_single_jobs_fill_the_cap_exactly(capped: Settings, serve: Callable[..., ServedApi]) -> None:
    alice_key, _ = make_key(capped, "alice")
    bob_key, _ = make_key(capped, "bob")
    alice, bob = {"Authorization": f"Bearer {alice_key}"}, {"Authorization": f"Bearer {bob_key}"}
    servers = [serve(**same_database(capped)), serve(**same_database(capped))]
    refs = {"alice": upload(servers[0].url, alice), "bob": upload(servers[0].url, bob)}

    def post(i: int, tenant: str, headers: dict[str, str]) -> Callable[[], httpx.Response]:
        url = servers[i % 2].url + "/v1/jobs"
        body = {**JOB, "references": [refs[tenant]], "prompt": f"job {i}"}
        return lambda: httpx.post(url, headers=headers, json=body, timeout=60)

    answers = at_once([post(i, "alice", alice) for i in range(3 * CAP)] + [post(i, "bob", bob) for i in range(3)])
    alice_answers, bob_answers = answers[: 3 * CAP], answers[3 * CAP :]
    assert [r.status_code for r in alice_answers].count(202) == CAP, [r.text for r in alice_answers]
    for r in alice_answers:
        if r.status_code != 202:
            assert_refused_for_the_cap(r)
    assert [r.status_code for r in bob_answers] == [202] * 3  # another tenant's cap is its own
    assert queued(capped, "alice") == CAP and queued(capped, "bob") == 3


def test_two_api_processes_writing_groups_at_once_never_pass_the_cap(capped: Settings) -> None:
    """Two contexts (two engines, so two SQLite write locks: two processes) submit groups at once."""
    key, _ = make_key(capped, "alice")
    contexts = [ApiContext.build(capped), ApiContext.build(capped)]
    try:
        ref = upload_with(contexts[0], key)
        results: list[list[object]] = [[], []]
        gate = threading.Barrier(2)

        def write(i: int) -> None:
            gate.wait()
            results[i] = list(
                write_group(contexts[i], [job_request("alice", references=[ref], seed=100 * i + s) for s in range(8)])
            )

        threads = [threading.Thread(target=write, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        outcomes = results[0] + results[1]
        assert sum(isinstance(o, str) for o in outcomes) == CAP, outcomes
        assert all(isinstance(o, str) or (isinstance(o, ApiProblem) and o.status == 429) for o in outcomes)
        assert queued(capped, "alice") == CAP
    finally:
        for ctx in contexts:
            ctx.close()


def upload_with(ctx: ApiContext, key: str) -> str:
    """A reference of alice's, through an in-process app on `ctx`'s settings."""
    from fastapi.testclient import TestClient

    from scheduler.api.app import create_app

    with TestClient(create_app(ctx.settings, dispatcher=False)) as c:
        r = c.post(
            "/v1/references",
            headers={"Authorization": f"Bearer {key}"},
            files={"file": ("a.png", png_bytes(), "image/png")},
        )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])
