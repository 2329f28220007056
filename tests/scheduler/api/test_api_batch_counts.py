"""A large batch polled through GET /v1/batches/{id} and GET /v1/batches is counted a few times, not at
every request (the app on PostgreSQL; scheduler/api/tallies.py): counting 30,000 jobs reads every one
of their rows, and a tenant polling as fast as its rate limit lets it asked the central database for
that at every poll. What the tenant changes through the API shows at once."""

from __future__ import annotations

from typing import Any

import pytest
from fastapi.testclient import TestClient

from devkit.rows import queued_batch
from shared.db import ensure_database, make_engine, make_session_factory
from shared.settings import Settings
from tests.shared.conftest import engine_events

JOBS = 30_000


@pytest.fixture
def api_settings(api_settings: Settings, postgres_url: str) -> Settings:
    return api_settings.model_copy(update={"database_url": postgres_url})


def big_batch(settings: Settings, tenant: str) -> str:
    """A batch of JOBS queued jobs of `tenant`, inserted as a submission leaves them."""
    ensure_database(settings.database_url)
    engine = make_engine(settings.database_url)
    with make_session_factory(engine).begin() as session:
        batch_id = queued_batch(session, tenant=tenant, jobs=JOBS)
    engine.dispose()
    return batch_id


def test_polling_a_large_batch_counts_it_a_few_times_and_a_cancel_shows_at_once(
    client: TestClient, alice: dict[str, str], api_settings: Settings
) -> None:
    batch_id = big_batch(api_settings, "alice")
    counted: list[str] = []

    def statement(_conn: Any, _cursor: Any, sql: str, *_: Any) -> None:
        if "GROUP BY jobs.batch_id, jobs.status" in sql:
            counted.append(sql)

    polls = 60
    engine = client.app.state.ctx.engine  # type: ignore[attr-defined]
    with engine_events(engine, {"before_cursor_execute": statement}):
        for i in range(polls):
            r = client.get(f"/v1/batches/{batch_id}" if i % 2 else "/v1/batches", headers=alice)
            assert r.status_code == 200, r.text
            batch = r.json() if i % 2 else r.json()[0]
            assert (batch["id"], batch["total"], batch["counts"]["queued"]) == (batch_id, JOBS, JOBS)
    # Each count is served again for COST_FACTOR times what it took: far fewer counts than polls.
    assert 1 <= len(counted) <= polls // 3, f"{len(counted)} counts for {polls} polls"

    canceled = client.post(f"/v1/batches/{batch_id}/cancel", headers=alice)
    assert canceled.status_code == 200, canceled.text
    assert canceled.json()["counts"]["canceled"] == JOBS  # counted anew for the answer, not served from before
    again = client.get(f"/v1/batches/{batch_id}", headers=alice).json()
    assert (again["counts"]["canceled"], again["counts"]["queued"], again["status"]) == (JOBS, 0, "cancelled")
