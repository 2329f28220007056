"""`ipab tenants delete NAME --purge`: nothing of the tenant is left in SQL (every table), S3 (every key)
or Redis (every key under the prefix, and the render queue), and what it shared with another tenant stays
as long as that tenant uses it. On SQLite and PostgreSQL."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import inspect, select, text, update

from scheduler.batches.events import outbox_job_events
from shared import keys
from shared.db import Job, Plan, PlanSlot, make_engine, make_session_factory, utcnow
from shared.jobs import JobResult, claim_job, finish_job, transaction
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.scheduler.api.conftest import make_key, png_bytes
from tests.scheduler.submission.conftest import dispatch_all, run_ipab, write_jsonl

ENCODER = "vit-h-plain"


@pytest.fixture
def api_settings(settings: Settings, tmp_path: Path, database_url: str) -> Settings:
    """The API's settings on the test's database (SQLite, then PostgreSQL)."""
    model_set = tmp_path / "model-set.toml"
    model_set.write_text('name = "tiny"\nbase = "b"\nip_adapter = "a.safetensors"\nimage_encoder = "e"\n')
    return settings.model_copy(
        update={"model_set": model_set, "webhook_allow_private": True, "database_url": database_url}
    )


@pytest.fixture
def store(api_settings: Settings) -> ObjectStore:
    """The test's bucket."""
    return ObjectStore.from_settings(api_settings)


@pytest.fixture
def rclient(api_settings: Settings) -> Iterator[redis.Redis]:
    """The test's Redis database."""
    client = redis.Redis.from_url(api_settings.redis_url)
    yield client
    client.close()


def _headers(settings: Settings, tenant: str) -> dict[str, str]:
    key, _ = make_key(settings, tenant)
    return {"Authorization": f"Bearer {key}"}


def _upload(client: TestClient, headers: dict[str, str], color: tuple[int, int, int]) -> str:
    ref = client.post("/v1/references", headers=headers, files={"file": ("r.png", png_bytes(color), "image/png")})
    assert ref.status_code == 201, ref.text
    sha: str = ref.json()["id"]
    return sha


def _finish(settings: Settings, store: ObjectStore, job_id: str) -> None:
    """As a worker would: claim, upload the PNG, mark succeeded; then the webhook delivery loop's outbox scan."""
    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)
    attempt = claim_job(sessions=sessions, job_id=job_id, worker_host="gpu", lease_s=60, max_attempts=3)
    assert attempt is not None
    with sessions() as session:
        batch_id = session.scalars(select(Job.batch_id).where(Job.id == job_id)).one()
    key = keys.output_key(batch_id, job_id, attempt)
    store.put(key, b"png of " + job_id.encode())
    result = JobResult(output_key=key, output_sha256="ab" * 32, output_bytes=10, encode_s=0, denoise_s=1, upload_s=0)
    assert finish_job(sessions=sessions, job_id=job_id, attempt=attempt, result=result)
    with transaction(sessions) as session:
        outbox_job_events(session=session)
    engine.dispose()


def _embed(store: ObjectStore, client: redis.Redis, settings: Settings, sha: str) -> None:
    """What a worker's embedding cache writes for an image: a durable copy in S3 and one in Redis."""
    store.put(keys.embedding_key(ENCODER, sha), b"embedding")
    client.set(settings.redis_prefix + keys.EMBED_KEY.format(cache_key=f"{ENCODER}:{sha}"), b"embedding")


def _alice(
    client: TestClient, settings: Settings, store: ObjectStore, rclient: redis.Redis, tmp_path: Path, monkeypatch: Any
) -> dict[str, Any]:
    from tests.conftest import settings_env

    """Everything a tenant leaves behind; the strings that would betray any of it."""
    headers = _headers(settings, "alice")
    own, shared = _upload(client, headers, (10, 200, 10)), _upload(client, headers, (1, 2, 3))
    hook = {"url": "http://127.0.0.1:9/hook", "events": ["job.succeeded"]}
    sent = {"prompt": "alice's secret prompt", "references": [own, shared], "webhook": hook}
    done = client.post("/v1/jobs", headers={**headers, "Idempotency-Key": "alice-idem-1"}, json=sent).json()["id"]
    queued = client.post("/v1/jobs", headers=headers, json={"prompt": "p", "references": [own]})
    assert queued.status_code == 202, queued.text
    _finish(settings, store, done)
    # A job whose output went on expiry before the purge (its row is all that is left of it).
    expiring = {"prompt": "alice's expired prompt", "references": [own], "expires_after": "1h"}
    expired = client.post("/v1/jobs", headers=headers, json=expiring).json()["id"]
    _finish(settings, store, expired)
    _expire_and_sweep(settings, store, rclient, expired)
    dispatch_all(settings, "tiny")  # the queued job's message is in the render queue, its id in the queued set
    for sha in (own, shared):
        _embed(store, rclient, settings, sha)
    rclient.set(settings.redis_prefix + "ratelimit:alice", b"3")  # a key named after the tenant
    rclient.set(settings.redis_prefix + keys.PROGRESS_KEY.format(job_id=done), b"{}")
    # A batch submitted from the command line for the tenant (its images linked to the batch, not held).
    photo = tmp_path / "cli.png"
    photo.write_bytes(png_bytes((99, 0, 99)))
    manifest = write_jsonl(tmp_path / "rows.jsonl", [{"reference": str(photo), "prompt": "cli row"}])
    env = {**settings_env(settings), "IPAB_REFERENCE_ROOTS": str(tmp_path)}
    submitted = run_ipab(
        ["submit", str(manifest), "--model-set", "tiny", "--tenant", "alice"], env=env, monkeypatch=monkeypatch
    )
    assert submitted.code == 0, submitted.err
    engine = make_engine(settings.database_url)
    with transaction(make_session_factory(engine)) as session:
        plan = Plan(
            name="alice-nightly", schedule="0 3 * * *", timezone="UTC", manifest="/m.jsonl", model_set="tiny",
            tenant="alice", lane="scheduled", defaults="{}", catch_up="latest", overlap="skip", source="",
            schedule_from=utcnow(),
        )  # fmt: skip
        session.add(plan)
        session.flush()
        session.add(PlanSlot(plan_id=plan.id, slot_at=utcnow(), kind="manual", status="submitted",
                             batch_id=submitted.last_line, decided_by="t"))  # fmt: skip
        batches = [row[0] for row in session.execute(text("SELECT id FROM batches WHERE tenant = 'alice'"))]
        jobs = [row[0] for row in session.execute(select(Job.id).where(Job.batch_id.in_(batches)))]
    engine.dispose()
    cli_sha = hashlib.sha256(photo.read_bytes()).hexdigest()
    return {"shared": shared, "needles": ["alice", own, cli_sha, "alice-idem-1", *batches, *jobs], "jobs": jobs}


def _expire_and_sweep(settings: Settings, store: ObjectStore, rclient: redis.Redis, job_id: str) -> None:
    from shared.janitor.loop import janitor_pass

    engine = make_engine(settings.database_url)
    sessions = make_session_factory(engine)
    with transaction(sessions) as session:
        session.execute(update(Job).where(Job.id == job_id).values(expires_at=utcnow() - timedelta(seconds=5)))
    report = janitor_pass(sessions=sessions, store=store, redis_client=rclient, settings=settings)
    assert report.jobs_removed == 1
    engine.dispose()


def _bob(client: TestClient, settings: Settings, store: ObjectStore, shared_color: tuple[int, int, int]) -> str:
    headers = _headers(settings, "bob")
    shared = _upload(client, headers, shared_color)
    job = client.post("/v1/jobs", headers=headers, json={"prompt": "bob's", "references": [shared]}).json()["id"]
    _finish(settings, store, job)
    return str(job)


def _sql_text(settings: Settings) -> list[str]:
    """Every row of every table, as text."""
    engine = make_engine(settings.database_url)
    rows: list[str] = []
    with engine.connect() as conn:
        for table in inspect(conn).get_table_names():
            rows += [f"{table}: {tuple(row)}" for row in conn.execute(text(f'SELECT * FROM "{table}"'))]
    engine.dispose()
    return rows


def _redis_text(client: redis.Redis, settings: Settings) -> list[str]:
    """Every key under the prefix (and the render queue) with its value, as text."""
    found: list[str] = []
    names = [*client.scan_iter(match=settings.redis_prefix + "*"), keys.render_queue("tiny").encode()]
    for name in names:
        found.append(f"{name!r} {_value(client, name)!r}")
    return found


def _value(client: redis.Redis, name: bytes) -> Any:
    kind = client.type(name).decode()
    if kind == "string":
        return client.get(name)
    if kind == "list":
        return client.lrange(name, 0, -1)
    if kind == "set":
        return client.smembers(name)
    if kind == "hash":
        return client.hgetall(name)
    return client.zrange(name, 0, -1) if kind == "zset" else None


def _betrayed(texts: list[str], needles: list[str]) -> list[str]:
    return [f"{needle} in {t[:200]}" for t in texts for needle in needles if needle in t]


def test_a_purged_tenant_leaves_nothing_in_sql_s3_or_redis_and_shared_content_stays_for_the_other(
    client: TestClient,
    api_settings: Settings,
    store: ObjectStore,
    rclient: redis.Redis,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    settings_env: Callable[[Settings], dict[str, str]],
) -> None:
    alice = _alice(client, api_settings, store, rclient, tmp_path, monkeypatch)
    bob_job = _bob(client, api_settings, store, (1, 2, 3))
    needles: list[str] = alice["needles"]
    assert _betrayed(_sql_text(api_settings), needles) and _betrayed(store.list_keys(), needles)
    assert _betrayed(_redis_text(rclient, api_settings), needles)

    purged = run_ipab(
        ["tenants", "delete", "alice", "--purge"],
        env=settings_env(api_settings),
        monkeypatch=monkeypatch,
        modules=("scheduler.cli.retention",),
    )

    assert purged.code == 0, purged.err
    assert "tenant alice deleted" in purged.out
    assert _betrayed(_sql_text(api_settings), needles) == []
    assert _betrayed(store.list_keys(), needles) == []
    assert _betrayed(_redis_text(rclient, api_settings), needles) == []
    # Bob's job, and the image both tenants uploaded, with its embeddings, are all still there.
    shared: str = alice["shared"]
    bob = _headers(api_settings, "bob")
    assert client.get(f"/v1/jobs/{bob_job}", headers=bob).json()["image_url"] is not None
    assert store.exists(keys.embedding_key(ENCODER, shared)) and any(shared in k for k in store.list_keys("refs/"))
    assert client.get(f"/v1/references/{shared}", headers=bob).status_code == 200
    # Running it again finds nothing more to do.
    again = run_ipab(
        ["tenants", "delete", "alice", "--purge"],
        env=settings_env(api_settings),
        monkeypatch=monkeypatch,
        modules=("scheduler.cli.retention",),
    )
    assert again.code == 0 and "0 batch(es), 0 job(s)" in again.out, again.out + again.err
    assert json.dumps(alice["jobs"])  # the needles held real ids
