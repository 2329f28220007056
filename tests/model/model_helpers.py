"""Helpers for the model-layer tests: reference pictures and small, fast job parameters."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
from PIL import Image

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
