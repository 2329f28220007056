"""`NullRenderer`: a BENCHMARK FIXTURE ONLY. It has the Renderer's interface and does no model work.

It lets `bench.control_plane` measure what ipab itself costs per job (Celery, Redis, SQL,
S3, PNG encoding, the embedding cache) with the model taken out. Never used by ipab.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Final

import torch
from PIL import Image

from shared.model_set import ModelSetConfig
from shared.spec import GenerationParams

NULL_EMBED_DIM: Final = 1280  # the plain SDXL adapter's width (ViT-bigG projection)
NULL_IMAGE_PX: Final = 64
# Benchmarks that need jobs of a known length set this in the worker's environment.
RENDER_MS_ENV: Final = "BENCH_NULL_RENDER_MS"
RENDER_S: Final = float(os.environ.get(RENDER_MS_ENV, "0")) / 1000


class NullRenderer:
    """Same interface as `worker.pipeline.Renderer`; returns one fixed small image at once."""

    def __init__(self, name: str, config: ModelSetConfig | None = None) -> None:
        self.name = name
        self.config = config  # provenance hashes its (absent) files: an empty record
        self.device = torch.device("cpu")
        self.encoder_id = "null-renderer"
        self.embed_kind = "image_embeds"
        self.dtype = torch.float16
        self.embed_shape = (NULL_EMBED_DIM,)
        self._image = Image.new("RGB", (NULL_IMAGE_PX, NULL_IMAGE_PX), (128, 64, 32))
        self.render_s = RENDER_S  # a fixed pretend render time (bench/fairness.py); 0 elsewhere

    @classmethod
    def load(cls, config: ModelSetConfig, **_options: Any) -> NullRenderer:
        """Stands in for `Renderer.load`: reads nothing but the model set's name."""
        return cls(config.name, config)

    def encode(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """One zero embedding per image."""
        return [torch.zeros(NULL_EMBED_DIM, dtype=self.dtype) for _ in images]

    def generate(
        self, params: GenerationParams, embeds: Sequence[torch.Tensor], *, on_step: Callable[[int], None] | None = None
    ) -> Image.Image:
        """The fixed image (one step callback, so lease checks still run), after `render_s`."""
        if self.render_s:
            time.sleep(self.render_s)
        if on_step is not None:
            on_step(0)
        return self._image.copy()

    def generate_batch(
        self,
        items: Sequence[tuple[GenerationParams, Sequence[torch.Tensor]]],
        *,
        on_step: Callable[[int], None] | None = None,
        output: str = "pil",
    ) -> list[Any]:
        """The fixed image once per item."""
        return [self.generate(params, embeds, on_step=on_step) for params, embeds in items]


def install() -> None:
    """Make this process's worker context load a `NullRenderer` instead of the model set's weights.

    Call before the Celery worker starts: the prefork pool's children inherit the patch.
    """
    import worker.context

    worker.context.Renderer = NullRenderer  # type: ignore[attr-defined,assignment]
