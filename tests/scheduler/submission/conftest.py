"""The submit tests' helpers, imported by tests across the tree: real photos on disk, manifests, `ipab` run
in-process, the dispatcher run until it has fed Redis everything, and rows read back."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis
from PIL import Image
from sqlalchemy import func, select

from ipab import cli
from shared.db import Batch, Job, make_engine, make_session_factory
from shared.keys import render_queue
from shared.settings import Settings


def write_photos(folder: Path) -> dict[str, Path]:
    """scikit-image's astronaut (PNG), coffee (JPEG) and chelsea (PNG), written into `folder`."""
    import numpy as np
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    photos = {"astronaut": "astronaut.png", "coffee": "coffee.jpg", "chelsea": "chelsea.png"}
    paths = {}
    for name, filename in photos.items():
        array: np.ndarray[Any, Any] = getattr(data, name)()
        paths[name] = folder / filename
        Image.fromarray(array).save(paths[name], quality=90)  # quality is ignored for PNG
    return paths


def write_jsonl(path: Path, rows: Sequence[Mapping[str, Any] | str]) -> Path:
    """A JSONL manifest; a str row is written as is (to test malformed lines)."""
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Path:
    """A CSV manifest."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(header)
    writer.writerows(rows)
    path.write_text(buffer.getvalue())
    return path


@dataclass(frozen=True)
class Run:
    """The outcome of one in-process `ipab` command."""

    code: int
    out: str
    err: str

    @property
    def last_line(self) -> str:
        """The last line of stdout (where `ipab submit` prints the batch id)."""
        return self.out.strip().splitlines()[-1]


def run_ipab(
    argv: Sequence[str],
    *,
    env: Mapping[str, str],
    monkeypatch: pytest.MonkeyPatch,
    modules: Sequence[str] = ("scheduler.cli.batches",),
) -> Run:
    """Run `ipab ARGV` in this process with exactly `env`'s settings; only the scheduler's commands."""
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # The scheduler's commands alone: these tests need no worker code.
    monkeypatch.setattr(cli, "CONTROL_PLANE_MODULES", tuple(modules))
    out, err = io.StringIO(), io.StringIO()
    with redirect_stdout(out), redirect_stderr(err):
        code = cli.main(list(argv))
    return Run(code, out.getvalue(), err.getvalue())


def dispatch_all(settings: Settings, model_set: str) -> int:
    """Run the model set's dispatcher until every undispatched queued job is in Redis; returns how many moved."""
    from shared.dispatch.dispatcher import Dispatcher

    client = redis.Redis.from_url(settings.redis_url)
    engine = make_engine(settings.database_url)
    try:
        deep = settings.model_copy(update={"dispatch_depth": 10**9})
        dispatcher = Dispatcher.from_settings(
            sessions=make_session_factory(engine), redis_client=client, settings=deep, model_set=model_set
        )
        moved = 0
        while step := dispatcher.dispatch_once():
            moved += step
        return moved
    finally:
        engine.dispose()
        client.close()


def queue_length(settings: Settings, model_set: str, *, dispatch: bool = True) -> int:
    """How many messages wait in the model set's render queue, after a dispatcher has fed it everything."""
    if dispatch:
        dispatch_all(settings, model_set)
    client = redis.Redis.from_url(settings.redis_url)
    try:
        return int(client.llen(render_queue(model_set)))
    finally:
        client.close()


def count_rows(settings: Settings) -> tuple[int, int]:
    """(batches, jobs) in the settings' database."""
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            batches = session.scalar(select(func.count()).select_from(Batch)) or 0
            jobs = session.scalar(select(func.count()).select_from(Job)) or 0
    finally:
        engine.dispose()
    return batches, jobs


def load_jobs(settings: Settings) -> list[Job]:
    """Every job row, in manifest order."""
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            return list(session.scalars(select(Job).order_by(Job.line)))
    finally:
        engine.dispose()
