"""PNG output: the same job gives the same bytes, and the file says how it was made."""

from __future__ import annotations

import io
import json
from collections.abc import Callable
from typing import Any

import numpy as np
from PIL import Image

from tests.model.conftest import job, reference_image
from worker.png import encode_png, parameters_text


def test_the_same_job_twice_gives_identical_png_bytes(renderer_for: Callable[[str], Any]) -> None:
    renderer = renderer_for("default")
    params = job(prompt="a lighthouse", seed=12345)

    def render() -> bytes:
        embeds = renderer.encode([reference_image(40)])
        return encode_png(renderer.generate(params, embeds), params=params, model_set=renderer.name)

    first, second = render(), render()
    assert first == second
    assert first != encode_png(
        renderer.generate(job(seed=1), renderer.encode([reference_image(40)])), params=params, model_set="x"
    )


def test_the_png_carries_its_parameters_in_a1111_form_and_as_json() -> None:
    params = job(
        prompt="a fox", negative_prompt="blurry, dark", seed=42, guidance_scale=6.5, scheduler="dpmpp_2m_karras"
    )
    data = encode_png(Image.new("RGB", (64, 64)), params=params, model_set="sdxl-plus")
    text = Image.open(io.BytesIO(data)).text  # type: ignore[attr-defined]
    assert text["parameters"] == (
        "a fox\nNegative prompt: blurry, dark\n"
        "Steps: 4, Sampler: DPM++ 2M Karras, CFG scale: 6.5, Seed: 42, Size: 64x64, Model: sdxl-plus, "
        "IP-Adapter scale: 0.6"
    )
    assert json.loads(text["ipab"]) == {"model_set": "sdxl-plus", "params": params.to_json()}


def test_no_negative_prompt_line_without_one_and_block_scales_are_quoted() -> None:
    text = parameters_text(job(ip_adapter_scale={"up": {"block_0": [0.0, 1.0, 0.0]}}), model_set="m")
    assert "Negative prompt" not in text
    assert text.endswith('IP-Adapter scale: "{\\"up\\":{\\"block_0\\":[0.0,1.0,0.0]}}"')
    assert parameters_text(job(ip_adapter_scale="style"), model_set="m").endswith("IP-Adapter scale: style")


def test_a_prompt_beyond_latin_1_survives_in_the_png() -> None:
    params = job(prompt="a cat 猫 — ✨")
    data = encode_png(Image.new("RGB", (8, 8)), params=params, model_set="m")
    assert Image.open(io.BytesIO(data)).text["parameters"].startswith("a cat 猫 — ✨\n")  # type: ignore[attr-defined]


def test_a_job_rendered_in_a_batch_gives_the_png_of_its_single_render(renderer_for: Callable[[str], Any]) -> None:
    """Batching changes how the job ran, not its file: the PNG carries no batch size, and its pixels
    are those of the job rendered alone (CPU fp32: the floats agree within 1e-4)."""
    renderer = renderer_for("default")
    embeds = renderer.encode([reference_image(60 + i) for i in range(4)])
    items = [(job(prompt=f"a harbour {i}", seed=500 + i), [embeds[i]]) for i in range(4)]

    def png(item: tuple[Any, Any], image: Image.Image) -> bytes:
        return encode_png(image, params=item[0], model_set=renderer.name)

    singles = [png(item, renderer.generate_batch([item])[0]) for item in items]
    batched = [png(item, image) for item, image in zip(items, renderer.generate_batch(items), strict=True)]
    for alone, together in zip(singles, batched, strict=True):
        a, b = (np.asarray(Image.open(io.BytesIO(data)), dtype=np.int16) for data in (alone, together))
        # A float within 1e-4 rounds to the same level or, rarely, the next one.
        assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3
        assert (alone == together) == bool((a == b).all())  # the same pixels give the same bytes
    assert len(set(singles)) == 4
