"""`/readyz` needs no key, so anybody can ask it: a flood of probes costs SQL, Redis and S3 one
check a second, and what it reports of a failure has its credentials masked."""

from __future__ import annotations

import socket
import threading
import time
from typing import Any

from fastapi.testclient import TestClient

from scheduler.api.app import create_app
from scheduler.api.routes.health import READY_CACHE_S
from shared.settings import Settings


def test_a_flood_of_readiness_probes_checks_the_services_about_once_a_second(api_settings: Settings) -> None:
    app = create_app(api_settings, dispatcher=False)
    with TestClient(app) as client:
        store = app.state.ctx.store
        real_exists = store.exists
        probes: list[str] = []

        def counted_exists(key: str) -> Any:  # the real S3 request, counted
            probes.append(key)
            return real_exists(key)

        store.exists = counted_exists
        answers: list[int] = []
        gate = threading.Barrier(16)

        def ask() -> None:
            gate.wait()
            answers.extend(client.get("/readyz").status_code for _ in range(10))

        threads = [threading.Thread(target=ask) for _ in range(16)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed_s = time.monotonic() - started

    assert answers == [200] * 160
    # One check per READY_CACHE_S at most (160 before), however long a loaded machine took.
    assert 1 <= len(probes) <= 1 + elapsed_s / READY_CACHE_S, (len(probes), elapsed_s)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_failed_check_is_reported_with_its_credentials_masked(api_settings: Settings) -> None:
    endpoint = f"http://probe:s3cret-pass@127.0.0.1:{_closed_port()}"
    settings = api_settings.model_copy(update={"s3_endpoint_url": endpoint})
    with TestClient(create_app(settings, dispatcher=False)) as client:
        answer = client.get("/readyz")

    assert answer.status_code == 503, answer.text
    checks = answer.json()["checks"]
    assert checks["sql"] == "ok" and checks["redis"] == "ok"
    assert "s3cret-pass" not in answer.text and "probe:***@127.0.0.1" in checks["s3"], checks["s3"]
