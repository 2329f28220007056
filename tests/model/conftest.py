"""Fixtures for the model layer: one tiny random-weight model set per session, Renderers loaded once."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from shared.model_set import read_model_set


@pytest.fixture(scope="session")
def tiny_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model-set tomls of the tiny set (seed 0), by "<variant>.<format>[.single_file]" and "default"."""
    from devkit.synth import write_tiny_model_set

    return write_tiny_model_set(tmp_path_factory.mktemp("tiny-models"), seed=0)


@pytest.fixture(scope="session")
def tiny_dir(tiny_sets: dict[str, Path]) -> Path:
    """The folder the tiny set was written to."""
    return tiny_sets["default"].parent


@pytest.fixture(scope="session")
def renderer_for(tiny_sets: dict[str, Path]) -> Iterator[Callable[[str], Any]]:
    """`renderer_for(key)`: a CPU fp32 Renderer for that model set, loaded once per session."""
    from worker.pipeline import Renderer

    loaded: dict[str, Any] = {}

    def get(key: str) -> Any:
        if key not in loaded:
            loaded[key] = Renderer.load(read_model_set(tiny_sets[key]), device="cpu", dtype="float32")
        return loaded[key]

    yield get
    loaded.clear()
