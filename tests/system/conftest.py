"""Fixtures for system tests: the tiny model set, real `ipab worker` processes, waiting on batches."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.settings import Settings
from tests.system.helpers import Workers, worker_pool


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
