"""The fast-path switches give the same images as the default path (CPU fp32, tiny model).

torch.compile is tested only when RUN_COMPILE_TESTS=1: compiling even the tiny UNet takes
minutes on a small CPU, so CI checks that compile is armed (test_model_render) and this file
checks that a warm-up renders and that its images equal eager ones where it runs.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shared.model_set import read_model_set
from tests.model.conftest import job, reference_image

Renderers = Callable[[str], Any]
TOLERANCE = 1e-4


def _load(
    tiny_sets: dict[str, Path], *, fuse_qkv: bool = False, channels_last: bool = False, compile: bool = False
) -> Any:
    from worker.pipeline import Renderer

    config = read_model_set(tiny_sets["default"])
    return Renderer.load(
        config, device="cpu", dtype="float32", fuse_qkv=fuse_qkv, channels_last=channels_last, compile=compile
    )


def _four_images(renderer: Any) -> list[np.ndarray]:
    embeds = renderer.encode([reference_image(80 + i) for i in range(4)])
    items = [(job(prompt=f"a tower {i}", seed=200 + i), [embeds[i]]) for i in range(4)]
    return list(renderer.generate_batch(items, output="np"))


def _max_difference(a: list[np.ndarray], b: list[np.ndarray]) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b, strict=True))


def _processor_kinds(renderer: Any) -> dict[str, int]:
    kinds: dict[str, int] = {}
    for processor in renderer.pipe.unet.attn_processors.values():
        kinds[type(processor).__name__] = kinds.get(type(processor).__name__, 0) + 1
    return kinds


def test_attention_runs_on_sdpa_by_default(renderer_for: Renderers) -> None:
    kinds = _processor_kinds(renderer_for("default"))
    assert set(kinds) == {"AttnProcessor2_0", "IPAdapterAttnProcessor2_0"}  # both torch SDPA


def test_fused_qkv_keeps_the_adapter_and_gives_the_same_images(
    tiny_sets: dict[str, Path], renderer_for: Renderers
) -> None:
    default = renderer_for("default")
    fused = _load(tiny_sets, fuse_qkv=True)
    kinds = _processor_kinds(fused)
    assert kinds["IPAdapterAttnProcessor2_0"] == _processor_kinds(default)["IPAdapterAttnProcessor2_0"]
    assert set(kinds) == {"FusedAttnProcessor2_0", "IPAdapterAttnProcessor2_0"}
    assert _max_difference(_four_images(fused), _four_images(default)) <= TOLERANCE


def test_channels_last_gives_the_same_images(tiny_sets: dict[str, Path], renderer_for: Renderers) -> None:
    import torch

    fast = _load(tiny_sets, channels_last=True)
    weight = fast.pipe.unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) and not weight.is_contiguous()
    assert _max_difference(_four_images(fast), _four_images(renderer_for("default"))) <= TOLERANCE


def test_both_switches_together_give_the_same_images(tiny_sets: dict[str, Path], renderer_for: Renderers) -> None:
    fast = _load(tiny_sets, fuse_qkv=True, channels_last=True)
    assert _max_difference(_four_images(fast), _four_images(renderer_for("default"))) <= TOLERANCE


@pytest.mark.skipif(os.environ.get("RUN_COMPILE_TESTS") != "1", reason="torch.compile takes minutes on a CPU")
def test_a_compiled_warmed_up_renderer_gives_the_same_images(
    tiny_sets: dict[str, Path], renderer_for: Renderers
) -> None:
    compiled = _load(tiny_sets, compile=True)
    compiled.warm_up(batch_sizes=[1, 4], width=64, height=64)
    assert _max_difference(_four_images(compiled), _four_images(renderer_for("default"))) <= TOLERANCE
