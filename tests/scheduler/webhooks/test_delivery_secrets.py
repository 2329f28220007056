"""A webhook is never signed without a secret: plans create their tenant (with one), and delivery waits for it."""

from __future__ import annotations

import pytest
from sqlalchemy.orm import Session, sessionmaker

from scheduler.plans.planfile import PlanSpec
from scheduler.plans.views import apply_specs
from scheduler.tenants import ensure_tenant, tenant_secret
from scheduler.webhooks.signing import verify
from shared.db import utcnow
from shared.jobs import transaction
from shared.settings import Settings
from tests.scheduler.webhooks.conftest import add_messages, delivering, message, receiver, sessions_of


@pytest.fixture
def setup(database_url: str) -> tuple[Settings, sessionmaker[Session]]:
    """Delivery settings (loopback allowed, quick poll and retries) and sessions on a fresh database."""
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=database_url,
        webhook_allow_private=True,
        webhook_poll_s=0.1,
        webhook_retry_base_s=0.3,
    )
    return settings, sessions_of(settings)


def plan_for(tenant: str) -> PlanSpec:
    """A nightly plan of `tenant` with a webhook."""
    return PlanSpec(
        name="nightly",
        schedule="0 2 * * *",
        timezone="UTC",
        manifest="/plans/rows.jsonl",
        model_set="tiny",
        tenant=tenant,
        webhook_url="https://hooks.example.com/ipab",
    )


def test_a_plan_for_a_new_tenant_creates_the_tenant_with_a_secret_shown_once(
    setup: tuple[Settings, sessionmaker[Session]],
) -> None:
    _, sessions = setup
    [applied] = apply_specs(sessions=sessions, specs=[plan_for("newco")], now=utcnow())
    with transaction(sessions) as session:
        secret = tenant_secret(session=session, tenant="newco")
    assert secret is not None and secret.startswith("whsec_")
    assert applied["webhook_secret"] == secret
    [again] = apply_specs(sessions=sessions, specs=[plan_for("newco")], now=utcnow())
    assert again["webhook_secret"] is None
    with transaction(sessions) as session:
        assert tenant_secret(session=session, tenant="newco") == secret


def test_a_message_waits_while_its_tenant_has_no_secret_and_is_sent_signed_once_it_has_one(
    setup: tuple[Settings, sessionmaker[Session]],
) -> None:
    settings, sessions = setup
    with delivering(settings, sessions), receiver() as hooks:
        [msg_id] = add_messages(sessions, tenant="ghost", url=hooks.url + "/ghost", count=1)
        assert hooks.wait_for("/ghost", 1.5) is None, "sent without a secret"
        waiting = message(sessions, msg_id)
        assert waiting.delivered_at is None and waiting.failed_at is None
        assert "ghost" in (waiting.last_error or "") and "secret" in (waiting.last_error or ""), waiting.last_error
        assert waiting.next_attempt_at > waiting.created_at
        with transaction(sessions) as session:
            secret = ensure_tenant(session=session, name="ghost")
        assert secret is not None
        got = hooks.wait_for("/ghost", 5.0)
    assert got is not None, "not sent once the secret existed"
    assert verify(secret=secret, headers=got.headers, body=got.body)
    assert message(sessions, msg_id).delivered_at is not None
