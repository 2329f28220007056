"""The beat on simulated days (in process, real SQL, Redis and S3): catch-up, DST, overlap, bad manifests."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from scheduler.plans import store
from scheduler.plans.beat import beat_pass
from scheduler.plans.runner import SlotContext, run_slot
from shared.db import Job, Plan, WebhookSubscription
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.scheduler.plans.conftest import (
    Clock,
    apply,
    batch_names,
    jobs_per_batch,
    plan_context,
    plan_fields,
    run_days,
    slots,
    write_manifest,
    write_plan,
)

START = datetime(2025, 12, 31, 12, 0)  # run_days goes on to 2026-01-01 02:00


@pytest.fixture
def plan_settings(settings: Settings, database_url: str) -> Settings:
    """The test's Redis and S3, on SQLite and on PostgreSQL."""
    return settings.model_copy(update={"database_url": database_url})


@pytest.fixture
def clock() -> Clock:
    return Clock(START)


@pytest.fixture
def ctx(plan_settings: Settings, clock: Clock, tmp_path: Path) -> Iterator[SlotContext]:
    write_manifest(tmp_path)
    with plan_context(plan_settings, clock) as context:
        yield context


def nightly(ctx: SlotContext, tmp_path: Path, **overrides: Any) -> None:
    assert apply(ctx, write_plan(tmp_path, **plan_fields(**overrides))) == "created"


def names(days: list[int]) -> list[str]:
    return [f"nightly@2026-01-{day:02d}T02:00:00+00:00" for day in days]


@pytest.mark.parametrize(("catch_up", "caught_up"), [("latest", [6]), ("all", [4, 5, 6])])
def test_three_days_without_a_beat_are_caught_up_by_catch_up(
    ctx: SlotContext, clock: Clock, tmp_path: Path, catch_up: str, caught_up: list[int]
) -> None:
    nightly(ctx, tmp_path, catch_up=catch_up, overlap="queue")
    run_days(ctx, clock, 3)
    clock.at = datetime(2026, 1, 6, 12, 0)  # no beat ran on the 4th, 5th and 6th
    beat_pass(ctx)
    beat_pass(ctx)  # a second pass finds nothing more to do
    run_days(ctx, clock, 1)

    assert batch_names(ctx.sessions) == names([1, 2, 3, *caught_up, 7])
    assert set(jobs_per_batch(ctx.sessions).values()) == {2}
    reasons = {s.slot_at.day: s.reason for s in slots(ctx.sessions)}
    if catch_up == "latest":
        assert reasons[6] == "2 earlier missed slot(s) not run (catch_up = latest)"


def test_catch_up_none_records_the_missed_slot_as_skipped_and_runs_the_next(
    ctx: SlotContext, clock: Clock, tmp_path: Path
) -> None:
    nightly(ctx, tmp_path, catch_up="none", overlap="queue")
    run_days(ctx, clock, 1)
    clock.at = datetime(2026, 1, 3, 12, 0)
    beat_pass(ctx)
    run_days(ctx, clock, 1)

    assert batch_names(ctx.sessions) == names([1, 4])
    missed = [s for s in slots(ctx.sessions) if s.status == "skipped"]
    assert [(s.slot_at, s.batch_id) for s in missed] == [(datetime(2026, 1, 3, 2, 0), None)]
    assert "missed by 36000 s" in (missed[0].reason or "")


@pytest.mark.parametrize(
    ("start", "expected"),
    [
        (
            datetime(2026, 3, 26, 12, 0),
            ["03-27T02:30:00+01:00", "03-28T02:30:00+01:00", "03-29T03:00:00+02:00", "03-30T02:30:00+02:00"],
        ),
        (
            datetime(2026, 10, 23, 12, 0),
            ["10-24T02:30:00+02:00", "10-25T02:30:00+02:00", "10-26T02:30:00+01:00", "10-27T02:30:00+01:00"],
        ),
    ],
    ids=["spring-forward", "fall-back"],
)
def test_europe_berlin_runs_every_night_once_across_the_dst_change(
    ctx: SlotContext, clock: Clock, tmp_path: Path, start: datetime, expected: list[str]
) -> None:
    clock.at = start
    nightly(ctx, tmp_path, schedule="30 2 * * *", timezone="Europe/Berlin", overlap="queue")
    for _ in range(4 * 24 * 4):  # a pass every 15 minutes for 4 days
        clock.advance(timedelta(minutes=15))
        beat_pass(ctx)

    assert batch_names(ctx.sessions) == [f"nightly@2026-{when}" for when in expected]
    found = slots(ctx.sessions)
    assert [s.reason for s in found] == [None] * 4  # each ran on time, none caught up
    utc_hours = [(s.slot_at.hour, s.slot_at.minute) for s in found]  # stored in UTC
    assert utc_hours in ([(1, 30), (1, 30), (1, 0), (0, 30)], [(0, 30), (0, 30), (1, 30), (1, 30)])


def finish_jobs(ctx: SlotContext) -> None:
    with ctx.sessions.begin() as session:
        session.execute(update(Job).values(status="succeeded"))


def test_overlap_skip_records_a_slot_skipped_while_the_previous_batch_runs(
    ctx: SlotContext, clock: Clock, tmp_path: Path
) -> None:
    nightly(ctx, tmp_path)  # overlap = skip is the default
    run_days(ctx, clock, 2)
    finish_jobs(ctx)
    run_days(ctx, clock, 1)

    assert batch_names(ctx.sessions) == names([1, 3])
    skipped = slots(ctx.sessions)[1]
    assert (skipped.status, skipped.batch_id) == ("skipped", None)
    assert skipped.reason == (
        "the previous batch nightly@2026-01-01T02:00:00+00:00 still has 2 unfinished job(s); overlap = skip"
    )


def test_a_manifest_invalid_at_slot_time_fails_that_slot_and_the_next_one_runs(
    ctx: SlotContext, clock: Clock, tmp_path: Path
) -> None:
    nightly(ctx, tmp_path, overlap="queue")
    manifest = tmp_path / "rows.jsonl"
    good = manifest.read_text()
    run_days(ctx, clock, 1)
    manifest.write_text(json.dumps({"reference": "ref.png", "prompt": "x", "width": 13}) + "\n")
    run_days(ctx, clock, 1)
    manifest.unlink()
    run_days(ctx, clock, 1)
    manifest.write_text(good)
    run_days(ctx, clock, 1)

    assert batch_names(ctx.sessions) == names([1, 4])
    found = slots(ctx.sessions)
    assert [s.status for s in found] == ["submitted", "failed", "failed", "submitted"]
    assert (found[1].reason or "").startswith("invalid manifest: line 1: width: ")
    assert "does not exist any more; restore it or apply the plan again" in (found[2].reason or "")


def test_a_paused_plan_runs_nothing_and_resumes_without_catching_up(
    ctx: SlotContext, clock: Clock, tmp_path: Path
) -> None:
    nightly(ctx, tmp_path, overlap="queue", catch_up="all")
    run_days(ctx, clock, 1)
    with ctx.sessions.begin() as session:
        store.set_enabled(plan=store.find_plan(session=session, name="nightly"), enabled=False, now=clock())
    run_days(ctx, clock, 2)
    with ctx.sessions.begin() as session:
        store.set_enabled(plan=store.find_plan(session=session, name="nightly"), enabled=True, now=clock())
    run_days(ctx, clock, 1)

    assert batch_names(ctx.sessions) == names([1, 4])


def test_a_plan_webhook_is_told_when_each_batch_completes(ctx: SlotContext, clock: Clock, tmp_path: Path) -> None:
    nightly(ctx, tmp_path, webhook="https://hooks.example.com/ipab", tenant="acme")
    run_days(ctx, clock, 1)

    with ctx.sessions() as session:
        batch_id = slots(ctx.sessions)[0].batch_id
        sub = session.scalars(select(WebhookSubscription)).one()
    assert (sub.subject_id, sub.kind, sub.tenant) == (batch_id, "batch", "acme")
    assert (sub.url, json.loads(sub.events)) == ("https://hooks.example.com/ipab", ["batch.completed"])


def test_a_slot_decided_twice_makes_one_batch(ctx: SlotContext, tmp_path: Path) -> None:
    nightly(ctx, tmp_path, overlap="queue")
    with ctx.sessions() as session:
        plan = session.scalars(select(Plan)).one()
    slot_at = datetime(2026, 1, 1, 2, 0)
    first = run_slot(ctx, plan, slot_at)
    second = run_slot(ctx, plan, slot_at)

    assert (first.status, first.added, second.status) == ("submitted", 2, "taken")
    assert jobs_per_batch(ctx.sessions) == {"nightly@2026-01-01T02:00:00+00:00": 2}


def test_an_s3_manifest_is_read_at_slot_time(ctx: SlotContext, clock: Clock, tmp_path: Path) -> None:
    store_ = ObjectStore.from_settings(ctx.settings)
    store_.put("in/ref.png", (tmp_path / "ref.png").read_bytes())
    row = {"reference": store_.uri("in/ref.png"), "prompt": "from s3", "seed": 1}
    store_.put("in/rows.jsonl", (json.dumps(row) + "\n").encode())
    nightly(ctx, tmp_path, manifest=store_.uri("in/rows.jsonl"), overlap="queue")
    run_days(ctx, clock, 1)
    store_.delete("in/rows.jsonl")
    run_days(ctx, clock, 1)

    assert jobs_per_batch(ctx.sessions) == {"nightly@2026-01-01T02:00:00+00:00": 1}
    assert "does not exist or cannot be read" in (slots(ctx.sessions)[1].reason or "")
