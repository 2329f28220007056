"""Encoder placement: keeping the image encoder off the render device changes no image."""

from __future__ import annotations

from pathlib import Path

import torch

from shared.model_set import read_model_set
from tests.model.conftest import job, reference_image
from worker.pipeline import Renderer


def test_swapped_encoder_returns_to_host_memory_and_gives_the_same_embeddings(
    tiny_sets: dict[str, Path],
) -> None:
    config = read_model_set(tiny_sets["default"])
    plain = Renderer.load(config, device="cpu")
    swapped = Renderer.load(config, device="cpu", encoder_device="cpu")
    swapped.encoder_swap_device = torch.device("cpu")  # the render device; a GPU in production
    images = [reference_image(seed) for seed in (1, 2)]

    expected = plain.encode(images)
    got = swapped.encode(images)

    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    assert next(swapped.encoder.parameters()).device.type == "cpu"
    params = job(seed=5)
    assert list(plain.generate(params, expected).getdata()) == list(swapped.generate(params, got).getdata())
