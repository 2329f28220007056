"""Fixtures for system tests: the tiny model set, real `ipab worker` processes, and one finished dataset batch."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from devkit import services
from shared.settings import Settings
from tests.conftest import settings_env as env_of  # the function: the fixture of that name is per test
from tests.scheduler.submission.submit_helpers import write_photos
from tests.system.dataset_batch import GRID_TEMPLATE, PROMPTS, DatasetBatch, batch_settings, doom_one_reference
from tests.system.helpers import Workers, wait_for_batch, worker_pool


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
