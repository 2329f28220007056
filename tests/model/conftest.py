"""Fixtures for the model layer: one tiny random-weight model set per session, Renderers loaded once;
and the builders its tests import: reference pictures and small, fast job parameters."""

from __future__ import annotations

import io
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from shared.model_set import read_model_set
from shared.spec import GenerationParams, parse_params

SIZE_PX = 64
STEPS = 4


def reference_image(seed: int, size_px: int = 48) -> Image.Image:
    """A deterministic noise picture with some structure (a gradient), distinct per seed."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size_px, dtype=np.float32)[None, :, None]
    pixels = 0.5 * rng.integers(0, 256, (size_px, size_px, 3)) + 0.5 * ramp * ((seed % 3) + 1) / 3
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def png_bytes(image: Image.Image) -> bytes:
    """The image as PNG file bytes."""
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def job(**overrides: Any) -> GenerationParams:
    """Small, fast, validated parameters (64x64, 4 steps), with overrides."""
    raw: dict[str, Any] = {"prompt": "a red fox in the snow", "seed": 7, "width": SIZE_PX, "height": SIZE_PX}
    return parse_params({**raw, "steps": STEPS, **overrides})


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
