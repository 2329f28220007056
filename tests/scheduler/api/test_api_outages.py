"""The API while a service is down: 503 with Retry-After (never a 500), no job half made, and back once it returns."""

from __future__ import annotations

import threading
from typing import Any

from fastapi.testclient import TestClient

from devkit import services
from scheduler.api.app import create_app
from shared.settings import Settings
from tests.scheduler.api.conftest import JOB, assert_problem, job_count, make_key, upload


def test_sql_down_answers_every_concurrent_post_503_and_they_succeed_once_it_is_back(
    api_settings: Settings, private_postgres: services.Service
) -> None:
    settings = api_settings.model_copy(update={"database_url": private_postgres.url})
    key, _ = make_key(settings, "alice")
    alice = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings, dispatcher=False), raise_server_exceptions=False) as client:
        ref = upload(client, alice)
        assert client.post("/v1/jobs", headers=alice, json={**JOB, "references": [ref]}).status_code == 202
        private_postgres.stop()
        results: list[Any] = [None] * 8
        start = threading.Barrier(len(results))

        def post(i: int) -> None:
            start.wait()
            results[i] = client.post("/v1/jobs", headers=alice, json={**JOB, "references": [ref], "seed": i})

        threads = [threading.Thread(target=post, args=(i,)) for i in range(len(results))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for r in results:
            assert_problem(r, 503, "sql")
            assert int(r.headers["retry-after"]) > 0
        ready = client.get("/readyz")
        assert ready.status_code == 503 and "sql" in ready.text.lower()
        private_postgres.start()
        again = client.post("/v1/jobs", headers=alice, json={**JOB, "references": [ref], "seed": 1})
        assert again.status_code == 202, again.text
        assert client.get(f"/v1/jobs/{again.json()['id']}", headers=alice).json()["status"] == "queued"
    assert job_count(settings) == 2


def test_redis_down_still_queues_jobs_in_sql(api_settings: Settings, private_redis: services.Service) -> None:
    """SQL is the truth: the dispatcher finds the job when it rescans, even though its wake-up was lost."""
    settings = api_settings.model_copy(update={"redis_url": private_redis.url})
    key, _ = make_key(settings, "alice")
    alice = {"Authorization": f"Bearer {key}"}
    with TestClient(create_app(settings, dispatcher=False), raise_server_exceptions=False) as client:
        ref = upload(client, alice)
        private_redis.stop()
        r = client.post("/v1/jobs", headers=alice, json={**JOB, "references": [ref]})
        assert r.status_code == 202, r.text
        assert client.get(f"/v1/jobs/{r.json()['id']}", headers=alice).json()["status"] == "queued"
        assert client.get("/readyz").status_code == 503
    assert job_count(settings) == 1
