"""The plan tests' helpers, imported by plan tests across the tree: plan files, a manual clock, and reading
slots and batches back."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from PIL import Image
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from scheduler.plans import store
from scheduler.plans.beat import beat_pass
from scheduler.plans.planfile import read_plan_file
from scheduler.plans.runner import SlotContext
from shared.db import Batch, Job, PlanSlot, ensure_database, make_engine, make_session_factory
from shared.settings import Settings

MODEL_SET = "tiny"


def write_reference(folder: Path, name: str = "ref.png", *, shade: int = 90) -> Path:
    """A small real PNG image."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    Image.new("RGB", (32, 32), (shade, 120, 200)).save(path)
    return path


def write_manifest(folder: Path, rows: int = 2, name: str = "rows.jsonl") -> Path:
    """A JSONL manifest of `rows` small jobs on one reference image."""
    write_reference(folder)
    lines = [{"reference": "ref.png", "prompt": f"prompt {i}", "seed": i, "steps": 2} for i in range(rows)]
    path = folder / name
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(value)  # a TOML basic string is a JSON string


def write_plan(folder: Path, file_name: str = "plan.toml", **fields: Any) -> Path:
    """A plan file: the given fields, a `set` dict as its table."""
    table = fields.pop("set", None)
    lines = [f"{key} = {_toml_value(value)}" for key, value in fields.items()]
    if table:
        lines += ["", "[set]", *(f"{key} = {_toml_value(value)}" for key, value in table.items())]
    path = folder / file_name
    path.write_text("\n".join(lines) + "\n")
    return path


def plan_fields(**overrides: Any) -> dict[str, Any]:
    """A nightly plan at 02:00 UTC on `rows.jsonl`, with `overrides`."""
    return {"name": "nightly", "schedule": "0 2 * * *", "manifest": "rows.jsonl", "model_set": MODEL_SET} | overrides


class Clock:
    """A clock the test moves by hand; naive UTC."""

    def __init__(self, start: datetime) -> None:
        self.at = start

    def __call__(self) -> datetime:
        return self.at

    def advance(self, delta: timedelta) -> None:
        """Move the clock forward."""
        self.at += delta


@contextmanager
def plan_context(settings: Settings, clock: Clock) -> Iterator[SlotContext]:
    """A SlotContext on the settings' database (migrated) and the test's clock."""
    ensure_database(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        yield SlotContext(settings=settings, sessions=make_session_factory(engine), now=clock)
    finally:
        engine.dispose()


def apply(ctx: SlotContext, path: Path) -> str:
    """Apply a plan file at the context's clock time."""
    spec = read_plan_file(path, settings=ctx.settings)
    with ctx.sessions.begin() as session:
        return store.apply_plan(session=session, spec=spec, now=ctx.now())


def run_days(ctx: SlotContext, clock: Clock, days: int, *, at: timedelta = timedelta(hours=2, seconds=5)) -> None:
    """`days` simulated days: each, the clock moves to the next day's `at` (UTC) and a beat pass runs."""
    for _ in range(days):
        day = clock().replace(hour=0, minute=0, second=0, microsecond=0) + timedelta(days=1)
        clock.at = day + at
        beat_pass(ctx)


def slots(sessions: sessionmaker[Session], plan: str = "nightly") -> list[PlanSlot]:
    """The plan's slot rows, oldest first."""
    with sessions() as session:
        found = store.find_plan(session=session, name=plan)
        return list(reversed(store.plan_slots(session=session, plan_id=found.id, limit=100_000)))


def batch_names(sessions: sessionmaker[Session]) -> list[str]:
    """Every batch's name, sorted."""
    with sessions() as session:
        return sorted(session.scalars(select(Batch.name)))


def jobs_per_batch(sessions: sessionmaker[Session]) -> dict[str, int]:
    """Jobs per batch name."""
    with sessions() as session:
        stmt = select(Batch.name, func.count(Job.id)).join(Job, Job.batch_id == Batch.id).group_by(Batch.name)
        return dict(session.execute(stmt).tuples().all())


def write_clock(path: Path, at: datetime) -> None:
    """Set the file clock of `plans_clock_beat.py` (atomically: a reader never sees half a time)."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(at.isoformat())
    os.replace(tmp, path)
