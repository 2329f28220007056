"""Fixtures for system tests: the tiny model set, real `ipab worker` processes, and one finished dataset batch.

Also the helpers the system tests import: `ipab` in a subprocess and a manifest to submit, waiting on
a batch or a condition, reading a Prometheus page. The dataset batch is a grid (2 prompts x 3
references x 1 seed, 64x64, 2 steps) submitted with `ipab submit`; the object of one reference is
deleted before the worker starts, so its 2 jobs fail for real (`ObjectMissing`) and 4 succeed. The
worker stays up, so a test can grow the grid and wait for the new cells.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from devkit import services
from devkit.demo import write_reference_photos
from shared.db import TERMINAL, Job, JobStatus, make_engine, make_session_factory
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.conftest import REDIS_DATABASES, unique_name
from tests.conftest import settings_env as env_of  # the function: the fixture of that name is per test
from tests.scheduler.submission.conftest import write_photos

REPO = Path(__file__).resolve().parents[2]
SIZE = {"width": 64, "height": 64, "steps": 4}  # what `submit` sets on every row


# --- Real `ipab worker` processes ------------------------------------------------------------------


class Workers:
    """Real `ipab worker` processes started by a test; all killed at teardown."""

    def __init__(self, env: dict[str, str], logs: Path) -> None:
        self.env = env
        self.logs = logs
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, **extra_env: str) -> subprocess.Popen[bytes]:
        """Start one more worker process (its own process group, so a kill takes its pool too)."""
        log = (self.logs / f"worker-{len(self.procs)}.log").open("wb")
        proc = subprocess.Popen(
            [sys.executable, "-m", "ipab.cli", "worker", "--loglevel", "INFO"],
            env={**self.env, **extra_env},
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.procs.append(proc)
        return proc

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL a worker and its pool children, as the OOM killer would."""
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(self.logs.glob("worker-*.log")))


@contextlib.contextmanager
def worker_pool(
    settings: Settings, settings_env: Callable[[Settings], dict[str, str]], logs: Path
) -> Iterator[Workers]:
    """Real `ipab worker` processes for these settings (start them with `.start()`); killed on exit."""
    env = {**os.environ, **settings_env(settings), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    pool = Workers(env, logs)
    try:
        yield pool
    finally:
        pool.stop_all()


def wait_for_batch(
    settings: Settings, batch_id: str, *, timeout_s: float = 300, workers: Workers | None = None
) -> None:
    """Block until every job of the batch is terminal; fail with the worker logs otherwise."""
    sessions = make_session_factory(make_engine(settings.database_url))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with sessions() as session:
            live = session.scalar(
                select(func.count()).where(Job.batch_id == batch_id, Job.status.not_in([s.value for s in TERMINAL]))
            )
        if live == 0:
            return
        if workers and workers.procs and all(p.poll() is not None for p in workers.procs):
            pytest.fail(f"every worker exited while batch {batch_id} was unfinished\n{workers.log_text()}")
        time.sleep(0.5)
    logs = workers.log_text() if workers else ""
    pytest.fail(f"batch {batch_id} did not finish in {timeout_s} s\n{logs}")


# --- `ipab` in a subprocess, a manifest, waiting and metrics ------------------------------------


def write_manifest(folder: Path, rows: int) -> Path:
    """`folder/manifest.jsonl`: `rows` jobs over the 3 demo photos (in `folder/refs`)."""
    refs = write_reference_photos(folder / "refs")
    lines = [
        {"reference": str(refs[i % 3]), "prompt": f"prompt number {i}", "seed": 100 + i, "guidance_scale": 5.0}
        for i in range(rows)
    ]
    path = folder / "manifest.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def ipab(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """`ipab ARGS` in a subprocess with exactly `env`."""
    return subprocess.run(
        [sys.executable, "-m", "ipab.cli", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def submit(workers: Workers, manifest: Path, batch: str) -> str:
    """`ipab submit` of `manifest` into `batch` with the workers' settings, small renders (SIZE); the batch id."""
    sets = [a for k, v in SIZE.items() for a in ("--set", f"{k}={v}")]
    done = ipab(workers.env, "submit", str(manifest), "--batch", batch, *sets, cwd=manifest.parent)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def count_status(settings: Settings, batch_id: str, status: JobStatus) -> int:
    """How many of the batch's jobs have `status` now."""
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session:
        return int(
            session.scalar(select(func.count()).where(Job.batch_id == batch_id, Job.status == status.value)) or 0
        )


def wait_until(predicate: Callable[[], bool], *, timeout_s: float = 120, what: str = "") -> None:
    """Block until `predicate()` holds; fail the test after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.2)


def scrape(url: str, timeout_s: float = 180) -> dict[str, float]:
    """`name{labels}` -> value of every sample at `url` (retried until it answers)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            text = httpx.get(url, timeout=5).raise_for_status().text
            break
        except httpx.HTTPError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            samples[name] = float(value)
    return samples


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in samples.items() if k.split("{")[0] == name and all(w in k for w in wanted))


# --- One finished dataset batch (the export and gallery tests) ------------------------------------


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


# --- Fixtures ------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_model_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny random-weight model set (plain ViT-bigG-like adapter, safetensors)."""
    from devkit.synth import write_tiny_model_set

    folder = tmp_path_factory.mktemp("tiny-models")
    write_tiny_model_set(folder)
    return folder / "model-set.toml"


@pytest.fixture
def system_settings(settings: Settings, tiny_model_set: Path) -> Settings:
    """The test's settings, serving the tiny model set."""
    return settings.model_copy(update={"model_set": tiny_model_set})


@pytest.fixture
def workers(
    system_settings: Settings, settings_env: Callable[[Settings], dict[str, str]], tmp_path: Path
) -> Iterator[Workers]:
    """Start real worker processes with `workers.start()`; they are killed at the end."""
    with worker_pool(system_settings, settings_env, tmp_path) as pool:
        yield pool


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
    settings = batch_settings(folder, redis_server, s3_server, tiny_model_set)
    env: dict[str, Any] = {**os.environ, **env_of(settings), "OMP_NUM_THREADS": "1"}
    grid = folder / "grid.toml"
    with worker_pool(settings, env_of, folder) as pool:
        batch = DatasetBatch(settings, folder, grid, "", pool, env)
        grid.write_text(GRID_TEMPLATE.format(prompts=repr(PROMPTS).replace("'", '"')))
        run = batch.ipab("submit", str(grid))
        assert run.returncode == 0, run.stderr
        batch.batch_id = run.stdout.strip().splitlines()[-1]
        doom_one_reference(settings, photos["chelsea"])
        pool.start()
        wait_for_batch(settings, batch.batch_id, workers=pool)
        yield batch
