"""The tenant's lock (`scheduler.batches.limits`) on real SQLite and PostgreSQL: a second
transaction of the tenant waits until the first ends, whoever holds it, with or without a
tenant row; so a count taken after the lock stays true until the commit."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from typing import Final

import pytest
from sqlalchemy.orm import Session, sessionmaker

from scheduler.batches.limits import lock_tenant
from scheduler.tenants import ensure_tenant
from shared.db import ensure_database, make_engine, make_session_factory
from shared.jobs import transaction

HOLD_S: Final = 0.5


@pytest.fixture
def two_processes(database_url: str) -> Iterator[tuple[sessionmaker[Session], sessionmaker[Session]]]:
    """Two session factories on two engines: two connections pools, as two API processes have."""
    ensure_database(database_url)
    engines = [make_engine(database_url), make_engine(database_url)]
    yield make_session_factory(engines[0]), make_session_factory(engines[1])
    for engine in engines:
        engine.dispose()


def waited_s(sessions: tuple[sessionmaker[Session], sessionmaker[Session]], first: str, second: str) -> float:
    """How long `second`'s lock waited while `first`'s was held HOLD_S in another transaction."""
    held = threading.Event()

    def hold() -> None:
        with transaction(sessions[0]) as session:
            lock_tenant(session=session, tenant=first)
            held.set()
            time.sleep(HOLD_S)

    thread = threading.Thread(target=hold)
    thread.start()
    held.wait(10)
    t0 = time.perf_counter()
    with transaction(sessions[1]) as session:
        lock_tenant(session=session, tenant=second)
        waited = time.perf_counter() - t0
    thread.join()
    return waited


@pytest.mark.parametrize("with_row", [True, False], ids=["tenant-row", "no-tenant-row"])
def test_a_tenants_second_transaction_waits_for_the_first(
    two_processes: tuple[sessionmaker[Session], sessionmaker[Session]], with_row: bool
) -> None:
    if with_row:
        with transaction(two_processes[0]) as session:
            ensure_tenant(session=session, name="alice")
    assert waited_s(two_processes, "alice", "alice") >= HOLD_S * 0.8


def test_another_tenant_does_not_wait_on_postgres(
    two_processes: tuple[sessionmaker[Session], sessionmaker[Session]], database_url: str
) -> None:
    if not database_url.startswith("postgresql"):
        pytest.skip("SQLite has one writer at a time for the whole file: every tenant takes turns")
    assert waited_s(two_processes, "alice", "bob") < HOLD_S / 2
