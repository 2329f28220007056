"""Fixtures for API tests: an app on the test's services (in process), tenants with keys, an image; and the
helpers API tests share: uploads, problem checks, a job request, plan files and manifests in S3."""

from __future__ import annotations

import io
import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from PIL import Image
from sqlalchemy import func, select

from scheduler.api.app import create_app
from scheduler.api.job_groups import JobRequest
from scheduler.api.submission import parse_api_rows
from scheduler.tenants import create_key
from shared.db import Job, ensure_database, make_engine, make_session_factory
from shared.jobs import transaction
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.scheduler.api.served import ServedApi


def png_bytes(color: tuple[int, int, int] = (200, 30, 30), size: int = 64) -> bytes:
    """A small PNG."""
    out = io.BytesIO()
    Image.new("RGB", (size, size), color).save(out, format="PNG")
    return out.getvalue()


JOB: dict[str, Any] = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "seed": 7}  # a small valid job


def upload(client: TestClient, headers: dict[str, str], color: tuple[int, int, int] = (1, 2, 3)) -> str:
    """Upload a small PNG as `headers`' tenant; its reference id."""
    r = client.post("/v1/references", headers=headers, files={"file": ("a.png", png_bytes(color), "image/png")})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def job_count(settings: Settings) -> int:
    """How many jobs the test's database holds."""
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            return int(session.scalar(select(func.count()).select_from(Job)) or 0)
    finally:
        engine.dispose()


def assert_problem(r: Any, status: int, *words: str) -> None:
    """`r` is a problem+json of `status` whose text holds every one of `words` (any case)."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json"), r.headers
    text = r.text.lower()
    for word in words:
        assert word.lower() in text, (word, r.json())


def make_key(settings: Settings, tenant: str, *, admin: bool = False) -> tuple[str, str | None]:
    """(a new key of `tenant`, an admin key with `admin`, the tenant's secret if created now)."""
    ensure_database(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            new = create_key(session=session, tenant=tenant, admin=admin)
    finally:
        engine.dispose()
    return new.key, new.webhook_secret


def job_request(tenant: str, webhook: tuple[str, list[str]] | None = None, **fields: Any) -> JobRequest:
    """A parsed POST /v1/jobs request of `tenant`: JOB with `fields`, and `webhook` (url, events) if given."""
    parsed = parse_api_rows([(1, {**JOB, **fields})])
    assert parsed.rows, parsed.problems
    return JobRequest(tenant, parsed.rows[0], webhook)


TOML = {"content-type": "application/toml"}  # the headers of a plan file's body


def put_manifest(settings: Settings, rows: int = 2) -> str:
    """A JSONL manifest and its reference image in the test bucket; the manifest's s3:// URI."""
    store = ObjectStore.from_settings(settings)
    store.put("plans/ref.png", png_bytes(), content_type="image/png")
    reference = store.uri("plans/ref.png")
    lines = [{"reference": reference, "prompt": f"prompt {i}", "seed": i, "steps": 2} for i in range(rows)]
    store.put("plans/rows.jsonl", "".join(json.dumps(line) + "\n" for line in lines).encode())
    return store.uri("plans/rows.jsonl")


def plan_toml(**fields: Any) -> str:
    """A plan file's text (every value a TOML basic string, a JSON string)."""
    values = {"name": "nightly", "schedule": "0 2 * * *", "timezone": "Europe/Berlin", "tenant": "alice"} | fields
    return "".join(f"{key} = {json.dumps(value)}\n" for key, value in values.items())


@pytest.fixture
def api_settings(settings: Settings, tmp_path: Path) -> Settings:
    """Test settings with a (name-only) model set, private webhooks allowed, quick retries."""
    model_set = tmp_path / "model-set.toml"
    model_set.write_text('name = "tiny"\nbase = "b"\nip_adapter = "a.safetensors"\nimage_encoder = "e"\n')
    return settings.model_copy(
        update={
            "model_set": model_set,
            "webhook_allow_private": True,
            "webhook_poll_s": 0.2,
            "webhook_retry_base_s": 0.2,
        }
    )


@pytest.fixture
def client(api_settings: Settings) -> Iterator[TestClient]:
    """A TestClient on the app (no webhook dispatcher thread)."""
    with TestClient(create_app(api_settings, dispatcher=False), raise_server_exceptions=False) as c:
        yield c


@pytest.fixture
def alice(api_settings: Settings) -> dict[str, str]:
    """Authorization headers of tenant alice."""
    key, _ = make_key(api_settings, "alice")
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def bob(api_settings: Settings) -> dict[str, str]:
    """Authorization headers of tenant bob."""
    key, _ = make_key(api_settings, "bob")
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def admin(api_settings: Settings) -> dict[str, str]:
    """Authorization headers of an admin key (tenant ops)."""
    key, _ = make_key(api_settings, "ops", admin=True)
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
def serve(
    api_settings: Settings, settings_env: Callable[[Settings], dict[str, str]], tmp_path: Path
) -> Iterator[Callable[..., ServedApi]]:
    """`serve(**setting_updates)` starts a real `ipab api` process on the test's settings; killed at the end."""
    started: list[ServedApi] = []

    def start(**updates: Any) -> ServedApi:
        settings = api_settings.model_copy(update=updates)
        env = {**os.environ, **settings_env(settings), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
        server = ServedApi(env, tmp_path / f"api-{len(started)}.log")
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()
