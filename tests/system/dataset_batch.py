"""One small finished batch for the export and gallery tests, made once per session by a real worker
(the `dataset_batch` fixture, in tests/system/conftest.py).

A grid (2 prompts x 3 references x 1 seed, 64x64, 2 steps) is submitted with `ipab submit`;
the object of one reference is deleted before the worker starts, so its 2 jobs fail for
real (`ObjectMissing`) and 4 succeed. The worker stays up, so a test can grow the grid
and wait for the new cells.
"""

from __future__ import annotations

import hashlib
import random
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from sqlalchemy import select

from devkit import services
from shared.db import Job, make_engine, make_session_factory
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.conftest import REDIS_DATABASES, unique_name
from tests.system.helpers import Workers, wait_for_batch

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


def batch_settings(folder: Path, redis_server: services.Service, s3_server: services.Service, models: Path) -> Settings:
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


def doom_one_reference(settings: Settings, photo: Path) -> None:
    """Delete the stored object of `photo` so that its jobs fail (permanently) in the worker."""
    store = ObjectStore.from_settings(settings)
    sha = hashlib.sha256(photo.read_bytes()).hexdigest()
    for key in store.list_keys(f"refs/{sha}"):
        store.delete(key)


def sha256_of(data: bytes) -> str:
    """Hex sha256."""
    return hashlib.sha256(data).hexdigest()
