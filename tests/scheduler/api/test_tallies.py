"""Batch counts in the API (scheduler/api/tallies.py), a unit test: a fake count that takes what the
test says on a fake clock, on a real (empty) SQLite database.

A batch's counts are read again only after COST_FACTOR times what reading them cost (at most
MAX_STALE_S); a tenant's GETs count one thing at a time, and its other GETs share that count or
get 429 `busy`, waiting on the event loop; another tenant is not held up."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.orm import Session, sessionmaker

from scheduler.api.problems import ApiProblem
from scheduler.api.tallies import COST_FACTOR, MAX_STALE_S, Tallies
from scheduler.batches.counts import Tally
from shared.db import make_engine, make_session_factory


class FakeCount:
    """`count_jobs`: each call advances the clock by the cost of its batches; `hold` blocks a batch's count."""

    def __init__(self, costs: dict[str, float]) -> None:
        self.now = 100.0
        self.costs = costs
        self.calls: list[list[str]] = []
        self.hold: dict[str, threading.Event] = {}
        self.counting = threading.Event()

    def clock(self) -> float:
        return self.now

    def __call__(self, *, session: Session, batch_ids: list[str]) -> dict[str, Tally]:
        self.calls.append(list(batch_ids))
        self.counting.set()
        for batch_id in batch_ids:
            if batch_id in self.hold:
                assert self.hold[batch_id].wait(10)
        self.now += sum(self.costs[b] for b in batch_ids)
        tallies = {b: Tally() for b in batch_ids}
        for b in batch_ids:
            tallies[b].counts["queued"] = len(self.calls)  # which count it came from
        return tallies


@pytest.fixture
def sessions(tmp_path: Path) -> Iterator[sessionmaker[Session]]:
    engine = make_engine(f"sqlite:///{tmp_path / 'empty.db'}")
    yield make_session_factory(engine)
    engine.dispose()


def tallies_of(sessions: sessionmaker[Session], fake: FakeCount, **kw: Any) -> Tallies:
    return Tallies(sessions, clock=fake.clock, counter=fake, **kw)


def read(tallies: Tallies, tenant: str, batch_ids: list[str]) -> dict[str, Tally]:
    return asyncio.run(tallies.read(tenant, batch_ids))


def test_a_batch_is_counted_again_only_after_cost_factor_times_what_its_count_took(
    sessions: sessionmaker[Session],
) -> None:
    fake = FakeCount({"big": 0.1})
    tallies = tallies_of(sessions, fake)
    assert read(tallies, "t", ["big"])["big"].counts["queued"] == 1
    fake.now += 0.1 * COST_FACTOR - 0.01  # a poll just before its count is stale: served as it was
    assert read(tallies, "t", ["big"])["big"].counts["queued"] == 1
    fake.now += 0.02
    assert read(tallies, "t", ["big"])["big"].counts["queued"] == 2
    assert fake.calls == [["big"], ["big"]]


def test_a_small_batch_is_counted_at_every_poll_and_a_huge_one_at_most_every_max_stale_s(
    sessions: sessionmaker[Session],
) -> None:
    fake = FakeCount({"small": 0.001, "huge": 3.0})
    tallies = tallies_of(sessions, fake)
    for _ in range(3):
        read(tallies, "t", ["small"])
        fake.now += 0.05  # a client polling every 50 ms sees counts a few ms old
    assert fake.calls == [["small"]] * 3
    read(tallies, "t", ["huge"])
    fake.now += MAX_STALE_S - 0.01
    assert tallies.cached(["huge"])
    fake.now += 0.02
    assert not tallies.cached(["huge"])


def test_an_actions_recount_counts_anew_and_is_what_is_served_next(sessions: sessionmaker[Session]) -> None:
    fake = FakeCount({"big": 0.5})
    tallies = tallies_of(sessions, fake)
    read(tallies, "t", ["big"])
    assert tallies.recount("t", ["big"])["big"].counts["queued"] == 2
    assert read(tallies, "t", ["big"])["big"].counts["queued"] == 2


def test_a_page_of_batches_counts_only_those_not_cached_in_one_query(sessions: sessionmaker[Session]) -> None:
    fake = FakeCount({"a": 0.1, "b": 0.1, "c": 0.1})
    tallies = tallies_of(sessions, fake)
    read(tallies, "t", ["a"])
    assert set(read(tallies, "t", ["a", "b", "c"])) == {"a", "b", "c"}
    assert fake.calls == [["a"], ["b", "c"]]


async def _until(event: threading.Event) -> None:
    for _ in range(1000):
        if event.is_set():
            return
        await asyncio.sleep(0.01)
    raise AssertionError("the count never started")


def test_a_tenants_gets_share_its_count_and_another_tenant_is_not_held_up(sessions: sessionmaker[Session]) -> None:
    fake = FakeCount({"big": 1.0, "other": 0.01})
    fake.hold["big"] = threading.Event()
    tallies = tallies_of(sessions, fake)

    async def scenario() -> tuple[Any, Any]:
        first = asyncio.create_task(tallies.read("t", ["big"]))
        await _until(fake.counting)
        second = asyncio.create_task(tallies.read("t", ["big"]))  # waits on the event loop for the first's count
        assert await tallies.read("u", ["other"])  # another tenant counts while t's count runs
        fake.hold["big"].set()
        return await first, await second

    first, second = asyncio.run(scenario())
    assert first["big"] is second["big"]
    assert fake.calls == [["big"], ["other"]]


def test_a_get_that_waits_past_wait_s_for_its_tenants_count_gets_busy(sessions: sessionmaker[Session]) -> None:
    fake = FakeCount({"big": 1.0, "next": 1.0})
    fake.hold["big"] = threading.Event()
    tallies = tallies_of(sessions, fake, wait_s=0.2)

    async def scenario() -> ApiProblem:
        first = asyncio.create_task(tallies.read("t", ["big"]))
        await _until(fake.counting)
        try:
            await tallies.read("t", ["next"])
        except ApiProblem as e:
            refused = e
        else:
            raise AssertionError("a second count of the tenant was not refused")
        fake.hold["big"].set()
        await first
        assert await tallies.read("t", ["next"])  # the slot is free again
        return refused

    refused = asyncio.run(scenario())
    assert (refused.status, refused.kind, refused.headers["Retry-After"]) == (429, "busy", "1")
    assert "'t'" in refused.detail and "counting" in refused.detail
