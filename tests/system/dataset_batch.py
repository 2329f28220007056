"""One small finished batch for the export and gallery tests, made once per session by a real worker.

A grid (2 prompts x 3 references x 1 seed, 64x64, 2 steps) is submitted with `ipab submit`;
the object of one reference is deleted before the worker starts, so its 2 jobs fail for
real (`ObjectMissing`) and 4 succeed. The worker stays up, so a test can grow the grid
and wait for the new cells.
"""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from devkit import services
from shared.db import Job, make_engine, make_session_factory
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.conftest import REDIS_DATABASES, settings_env, unique_name
from tests.scheduler.submission.submit_helpers import write_photos
from tests.system.helpers import Workers, wait_for_batch, worker_pool

GRID_TEMPLATE = """
batch = "dataset-test"
[fixed]
width = 64
height = 64
steps = 2
[axes]
prompts = {prompts}
references = ["photos/astronaut.png", "photos/coffee.jpg", "photos/chelsea.png"]
seeds = {{count = 1, start = 7}}
"""
PROMPTS = ["a watercolor painting", "a bronze statue"]


@dataclass
class DatasetBatch:
    """The finished batch: its settings, folder, grid file, id, the worker pool and an `ipab` runner."""

    settings: Settings
    folder: Path
    grid: Path
    batch_id: str
    workers: Workers
    env: dict[str, str]

    def ipab(self, *args: str) -> subprocess.CompletedProcess[str]:
        """`ipab ARGS` in a subprocess with the batch's settings (stderr is not a terminal)."""
        return subprocess.run(
            [sys.executable, "-m", "ipab.cli", *args],
            env=self.env,
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=300,
        )

    def jobs(self) -> list[Job]:
        """Every job of the batch, as SQL holds it now, in manifest order."""
        engine = make_engine(self.settings.database_url)
        try:
            with make_session_factory(engine)() as session:
                stmt = select(Job).where(Job.batch_id == self.batch_id).order_by(Job.line, Job.id)
                return list(session.scalars(stmt))
        finally:
            engine.dispose()

    def grow(self, prompts: list[str]) -> None:
        """Rewrite the grid with these prompts, submit it and wait for the new cells."""
        self.grid.write_text(GRID_TEMPLATE.format(prompts=repr(prompts).replace("'", '"')))
        run = self.ipab("submit", str(self.grid))
        assert run.returncode == 0, run.stderr
        wait_for_batch(self.settings, self.batch_id, workers=self.workers)


def _settings(folder: Path, redis_server: services.Service, s3_server: services.Service, models: Path) -> Settings:
    store = ObjectStore(endpoint_url=s3_server.url, bucket=unique_name("t-"), region="us-east-1")
    store.ensure_bucket()
    db = random.randrange(REDIS_DATABASES // 2, REDIS_DATABASES)  # the per-test fixture counts up from 1
    settings: Settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=f"sqlite:///{folder / 'ipab.db'}",
        redis_url=redis_server.url.rsplit("/", 1)[0] + f"/{db}",
        redis_prefix=unique_name("t") + ":",
        s3_endpoint_url=s3_server.url,
        s3_bucket=store.bucket,
        s3_region=store.region,
        model_set=models,
        reference_roots=[folder],
    )
    return settings


def _doom_one_reference(settings: Settings, photo: Path) -> None:
    """Delete the stored object of `photo` so that its jobs fail (permanently) in the worker."""
    store = ObjectStore.from_settings(settings)
    sha = hashlib.sha256(photo.read_bytes()).hexdigest()
    for key in store.list_keys(f"refs/{sha}"):
        store.delete(key)


@pytest.fixture(scope="session")
def dataset_batch(
    tmp_path_factory: pytest.TempPathFactory,
    redis_server: services.Service,
    s3_server: services.Service,
    tiny_model_set: Path,
) -> Iterator[DatasetBatch]:
    """The finished batch (4 succeeded, 2 failed), with its worker still running."""
    folder = tmp_path_factory.mktemp("dataset-batch")
    photos = write_photos(folder / "photos")
    settings = _settings(folder, redis_server, s3_server, tiny_model_set)
    env: dict[str, Any] = {**os.environ, **settings_env(settings), "OMP_NUM_THREADS": "1"}
    grid = folder / "grid.toml"
    with worker_pool(settings, settings_env, folder) as pool:
        batch = DatasetBatch(settings, folder, grid, "", pool, env)
        grid.write_text(GRID_TEMPLATE.format(prompts=repr(PROMPTS).replace("'", '"')))
        run = batch.ipab("submit", str(grid))
        assert run.returncode == 0, run.stderr
        batch.batch_id = run.stdout.strip().splitlines()[-1]
        _doom_one_reference(settings, photos["chelsea"])
        pool.start()
        wait_for_batch(settings, batch.batch_id, workers=pool)
        yield batch


def sha256_of(data: bytes) -> str:
    """Hex sha256."""
    return hashlib.sha256(data).hexdigest()
