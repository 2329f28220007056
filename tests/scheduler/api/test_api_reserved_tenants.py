"""A key of a reserved tenant (issue 21, item 12), made before names were reserved, opens nothing."""

from __future__ import annotations

from fastapi.testclient import TestClient
from sqlalchemy import update

from shared.db import ApiKey, Tenant, make_engine, make_session_factory, utcnow
from shared.jobs import transaction
from shared.settings import Settings
from tests.scheduler.api.conftest import make_key


def test_a_key_of_default_made_before_names_were_reserved_is_refused_by_the_api(
    client: TestClient, api_settings: Settings
) -> None:
    key, _ = make_key(api_settings, "legacy")
    engine = make_engine(api_settings.database_url)
    try:
        with transaction(make_session_factory(engine)) as session:  # as an older ipab could write it
            session.add(Tenant(name="default", webhook_secret="whsec_old", created_at=utcnow()))
            session.flush()
            session.execute(update(ApiKey).values(tenant="default"))
    finally:
        engine.dispose()
    r = client.get("/v1/batches", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 403, r.text
    detail = r.json()["detail"]
    assert "'default'" in detail and "reserved" in detail and "ipab keys revoke" in detail
