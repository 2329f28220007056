"""One tenant's endpoint that never answers does not delay another tenant's webhooks.

Tenant alpha has 24 messages due to an endpoint that reads and never answers; tenant bravo
has one to an endpoint that answers at once. Bravo's delay (from due to received) is
measured alone, then beside alpha's dead endpoint, on the real delivery loop.
"""

from __future__ import annotations

import math
import time

import pytest
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from scheduler.tenants import ensure_tenant
from shared.db import WebhookMessage, utcnow
from shared.jobs import transaction
from shared.settings import Settings
from tests.scheduler.webhooks.conftest import Receiver, add_messages, delivering, receiver, sessions_of

pytestmark = pytest.mark.slow
DEAD_MESSAGES = 24
WAIT_S = 45.0  # past the old loop's 3 rounds of 10 s timeouts, so a failure shows the old figure


@pytest.fixture
def setup(database_url: str) -> tuple[Settings, sessionmaker[Session]]:
    """Delivery settings (loopback allowed, a quick poll, retries after the test) and sessions, two tenants."""
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=database_url,
        webhook_allow_private=True,
        webhook_poll_s=0.2,
        webhook_retry_base_s=600.0,  # a failed message is not due again during the test
    )
    sessions = sessions_of(settings)
    with transaction(sessions) as session:
        ensure_tenant(session=session, name="alpha")
        ensure_tenant(session=session, name="bravo")
    return settings, sessions


def bravo_delay(hooks: Receiver, sessions: sessionmaker[Session], path: str) -> float:
    """Seconds from bravo's message being due to its arrival (inf if it did not come in WAIT_S)."""
    start = time.monotonic()
    add_messages(sessions, tenant="bravo", url=hooks.url + path, count=1)
    got = hooks.wait_for(path, WAIT_S)
    return math.inf if got is None else got.at - start


def wait_hanging(hooks: Receiver, count: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while hooks.hanging < count and time.monotonic() < deadline:
        time.sleep(0.02)
    assert hooks.hanging >= count, hooks.hanging


def test_a_dead_endpoint_of_one_tenant_does_not_delay_another_tenants_webhook(
    setup: tuple[Settings, sessionmaker[Session]],
) -> None:
    settings, sessions = setup
    with delivering(settings, sessions), receiver() as hooks:
        alone = bravo_delay(hooks, sessions, "/fast/alone")
        add_messages(sessions, tenant="alpha", url=hooks.url + "/dead/a", count=DEAD_MESSAGES, age_s=1.0)
        wait_hanging(hooks, 1)
        beside = bravo_delay(hooks, sessions, "/fast/beside")
    print(f"\nbravo's webhook delay: alone {alone:.2f} s, beside {DEAD_MESSAGES} hanging of alpha {beside:.2f} s")
    assert alone < 2.0, alone
    assert beside < 2.0, beside


def test_a_tenant_has_at_most_two_deliveries_in_flight_and_the_rest_stay_unclaimed(
    setup: tuple[Settings, sessionmaker[Session]],
) -> None:
    settings, sessions = setup
    with delivering(settings, sessions), receiver() as hooks:
        ids = add_messages(sessions, tenant="alpha", url=hooks.url + "/dead/a", count=DEAD_MESSAGES, age_s=1.0)
        wait_hanging(hooks, 1)
        time.sleep(1.0)  # several passes of the loop
        with transaction(sessions) as session:
            still_due = session.scalars(
                select(WebhookMessage.id).where(WebhookMessage.id.in_(ids), WebhookMessage.next_attempt_at <= utcnow())
            ).all()
        assert hooks.most_hanging == 2, hooks.most_hanging
    assert len(still_due) == DEAD_MESSAGES - 2, len(still_due)  # claimed only what could start
