"""`DELETE /v1/references/{id}`: a person asks that their photo be deleted. The tenant's upload is
forgotten at once, the janitor deletes the image and its embeddings once nothing uses it, a batch
that still uses it keeps it until its own images go, and another tenant's upload of the same image
keeps it (and learns nothing). On SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import redis
from fastapi.testclient import TestClient

from scheduler.api.app import create_app
from shared import keys
from shared.db import make_engine, make_session_factory
from shared.janitor.loop import janitor_pass
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.scheduler.api.conftest import make_key, upload

ENCODER = "vit-h-plain"


@pytest.fixture
def api_settings(settings: Settings, tmp_path: Path, database_url: str) -> Settings:
    model_set = tmp_path / "model-set.toml"
    model_set.write_text('name = "tiny"\nbase = "b"\nip_adapter = "a.safetensors"\nimage_encoder = "e"\n')
    return settings.model_copy(update={"model_set": model_set, "database_url": database_url})


@pytest.fixture
def client(api_settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(api_settings, dispatcher=False), raise_server_exceptions=False) as c:
        yield c


def _headers(settings: Settings, tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {make_key(settings, tenant)[0]}"}


def _sweep(settings: Settings, store: ObjectStore) -> None:
    engine = make_engine(settings.database_url)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        for _ in range(2):
            janitor_pass(sessions=make_session_factory(engine), store=store, redis_client=client, settings=settings)
    finally:
        client.close()
        engine.dispose()


def _stored(store: ObjectStore, sha: str) -> bool:
    return any(sha in key for key in store.list_keys("refs/")) or store.exists(keys.embedding_key(ENCODER, sha))


def test_a_deleted_reference_goes_once_nothing_uses_it(client: TestClient, api_settings: Settings) -> None:
    store = ObjectStore.from_settings(api_settings)
    alice, bob = _headers(api_settings, "alice"), _headers(api_settings, "bob")
    alone, used, shared = (upload(client, alice, color) for color in ((9, 9, 9), (8, 8, 8), (7, 7, 7)))
    assert upload(client, bob, (7, 7, 7)) == shared
    for sha in (alone, used, shared):
        store.put(keys.embedding_key(ENCODER, sha), b"embedding")  # as a worker's cache writes it
    job = client.post("/v1/jobs", headers=alice, json={"prompt": "p", "references": [used]})
    assert job.status_code == 202, job.text

    for sha in (alone, used, shared):
        deleted = client.delete(f"/v1/references/{sha}", headers=alice)
        assert deleted.status_code == 202 and deleted.json() == {"id": sha, "status": "deleting"}, deleted.text
        assert client.get(f"/v1/references/{sha}", headers=alice).status_code == 404
        assert client.delete(f"/v1/references/{sha}", headers=alice).status_code == 404  # not the tenant's any more
    refused = client.post("/v1/jobs", headers=alice, json={"prompt": "p", "references": [alone]})
    assert refused.status_code in (404, 422) and alone in refused.text
    _sweep(api_settings, store)

    assert not _stored(store, alone)  # the photo and its embedding are gone
    assert _stored(store, used)  # the queued job still needs it: it goes with the batch's images
    assert _stored(store, shared) and client.get(f"/v1/references/{shared}", headers=bob).status_code == 200
    assert client.delete(f"/v1/references/{alone}", headers=bob).status_code == 404  # never bob's


def test_a_submission_whose_upload_was_deleted_meanwhile_is_refused_naming_it(
    client: TestClient, api_settings: Settings
) -> None:
    """The API looked the tenant's upload up, then it was deleted and the janitor removed it before the
    submission's transaction: the submission is refused with the id, not queued to fail in a worker."""
    from sqlalchemy import delete

    from scheduler.submission.references import ReferenceFile, ReferenceResolver, upload_references
    from shared.db import ReferenceImage, TenantReference
    from shared.errors import InvalidInput
    from shared.jobs import transaction

    store = ObjectStore.from_settings(api_settings)
    sha = upload(client, _headers(api_settings, "alice"), (5, 5, 5))
    engine = make_engine(api_settings.database_url)
    sessions = make_session_factory(engine)
    with transaction(sessions) as session:
        session.execute(delete(TenantReference).where(TenantReference.sha256 == sha))  # DELETE /v1/references
        session.execute(delete(ReferenceImage).where(ReferenceImage.sha256 == sha))  # then the janitor's step 2
    resolver = ReferenceResolver(store=store, roots=[], base_dir=Path("."))
    resolver.recorded.add(sha)  # known from the tenant's uploads when the request was read
    file = ReferenceFile(sha, "png", 64, 64, 100, source="upload")
    with pytest.raises(InvalidInput) as refused, transaction(sessions) as session:
        upload_references([file], resolver=resolver, session=session)
    engine.dispose()
    assert refused.value.field == "references" and refused.value.value == sha
    assert "upload it again" in str(refused.value)
