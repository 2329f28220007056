"""The Renderer against plain diffusers, and its two seams: encode and generate (single and batched)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from shared.errors import IncompatibleEncoder, JobCanceled, ModelSetError
from shared.model_set import read_model_set, write_model_set
from tests.model.conftest import job, reference_image

Renderers = Callable[[str], Any]
VARIANTS = ("ip-adapter_sdxl", "ip-adapter_sdxl_vit-h", "ip-adapter-plus_sdxl_vit-h", "ip-adapter-plus-face_sdxl_vit-h")
ENCODER_FOLDERS = {"ip-adapter_sdxl": "sdxl_models/image_encoder"}


def _diffusers_pipeline(tiny_dir: Path, variant: str | None) -> Any:
    """What a diffusers user writes: from_pretrained + load_ip_adapter on the same files."""
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir / "base")
    if variant is not None:
        encoder = ENCODER_FOLDERS.get(variant, "models/image_encoder")
        pipe.load_ip_adapter(
            str(tiny_dir / "IP-Adapter"),
            subfolder="sdxl_models",
            weight_name=f"{variant}.safetensors",
            image_encoder_folder=encoder,
        )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_image(pipe: Any, *, scale: float | None = None, **kwargs: Any) -> np.ndarray:
    params = job()
    if scale is not None:
        pipe.set_ip_adapter_scale(scale)
    result = pipe(
        prompt=params.prompt,
        width=params.width,
        height=params.height,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale,
        generator=torch.Generator().manual_seed(params.seed),
        output_type="np",
        **kwargs,
    )
    return np.asarray(result.images[0])


def _render(renderer: Any, params: Any, images: list[Any]) -> np.ndarray:
    return np.asarray(renderer.generate_batch([(params, renderer.encode(images))], output="np")[0])


@pytest.mark.parametrize("variant", ["ip-adapter_sdxl", "ip-adapter-plus_sdxl_vit-h"])
def test_output_equals_plain_diffusers_on_the_same_files_seed_and_parameters(
    tiny_dir: Path, renderer_for: Renderers, variant: str
) -> None:
    reference = reference_image(1)
    expected = _diffusers_image(_diffusers_pipeline(tiny_dir, variant), scale=0.6, ip_adapter_image=reference)
    ours = _render(renderer_for(f"{variant}.safetensors"), job(ip_adapter_scale=0.6), [reference])
    # Not bit for bit: diffusers computes on memory-mapped weights, whose alignment changes
    # the last bits of CPU matmuls; the Renderer copies them (see loading.materialize).
    assert np.abs(ours - expected).max() <= 1e-5


def test_generating_from_embeddings_equals_generating_from_the_image_bit_for_bit(renderer_for: Renderers) -> None:
    for key in ("ip-adapter_sdxl.safetensors", "ip-adapter-plus_sdxl_vit-h.safetensors"):
        renderer = renderer_for(key)
        reference = reference_image(2)
        from_embeddings = _render(renderer, job(ip_adapter_scale=0.6), [reference])
        from_image = _diffusers_image(renderer.pipe, scale=0.6, ip_adapter_image=reference)
        assert np.array_equal(from_embeddings, from_image), key


def test_scale_zero_equals_the_base_model_without_adapter(tiny_dir: Path, renderer_for: Renderers) -> None:
    from worker.loading import materialize

    base = _diffusers_pipeline(tiny_dir, None)
    for module in (base.unet, base.vae, base.text_encoder, base.text_encoder_2):
        materialize(module)  # the same weight memory layout as the Renderer's
    without_adapter = _diffusers_image(base)
    ours = _render(renderer_for("default"), job(ip_adapter_scale=0.0), [reference_image(3)])
    assert np.array_equal(ours, without_adapter)
    assert np.abs(_render(renderer_for("default"), job(ip_adapter_scale=1.0), [reference_image(3)]) - ours).max() > 1e-2


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_every_variant_and_format_loads_and_follows_its_reference(
    renderer_for: Renderers, variant: str, fmt: str
) -> None:
    renderer = renderer_for(f"{variant}.{fmt}")
    assert renderer.embed_kind == ("hidden_states" if "plus" in variant else "image_embeds")
    one, other = _render(renderer, job(), [reference_image(4)]), _render(renderer, job(), [reference_image(5)])
    assert one.shape == (64, 64, 3) and np.isfinite(one).all()
    assert np.abs(one - other).max() > 1e-3  # the reference changes the image


def test_bin_and_safetensors_give_the_same_image(renderer_for: Renderers) -> None:
    images = [
        _render(renderer_for(f"ip-adapter-plus_sdxl_vit-h.{f}"), job(), [reference_image(6)])
        for f in ("bin", "safetensors")
    ]
    assert np.array_equal(*images)


@pytest.mark.parametrize("variant", ["ip-adapter_sdxl", "ip-adapter-plus-face_sdxl_vit-h"])
def test_the_single_file_checkpoint_gives_the_same_image_as_its_diffusers_folder(
    renderer_for: Renderers, variant: str
) -> None:
    folder = _render(renderer_for(f"{variant}.safetensors"), job(), [reference_image(7)])
    single = _render(renderer_for(f"{variant}.safetensors.single_file"), job(), [reference_image(7)])
    assert np.array_equal(folder, single)


def test_an_adapter_paired_with_the_wrong_encoder_names_the_encoder_it_needs(tmp_path: Path, tiny_dir: Path) -> None:
    from worker.pipeline import Renderer

    adapters = tiny_dir / "IP-Adapter/sdxl_models"
    bigg, vit_h = tiny_dir / "IP-Adapter/sdxl_models/image_encoder", tiny_dir / "IP-Adapter/models/image_encoder"
    for adapter, encoder, needed in [
        ("ip-adapter_sdxl_vit-h.safetensors", bigg, "projection_dim 32"),
        ("ip-adapter_sdxl.bin", vit_h, "projection_dim 40"),
        ("ip-adapter-plus_sdxl_vit-h.safetensors", bigg, "hidden_size 48"),
    ]:
        toml = tmp_path / "model-set.toml"
        write_model_set(
            toml,
            name="mixed",
            base=str(tiny_dir / "base"),
            ip_adapter=str(adapters / adapter),
            image_encoder=str(encoder),
        )
        with pytest.raises(IncompatibleEncoder, match=f"needs an image encoder with {needed}") as e:
            Renderer.load(read_model_set(toml), device="cpu")
        assert adapter in str(e.value) and str(encoder) in str(e.value)


def test_a_hub_base_missing_from_the_offline_cache_says_so(tmp_path: Path, tiny_dir: Path) -> None:
    from worker.pipeline import Renderer

    toml = tmp_path / "model-set.toml"
    adapter = tiny_dir / "IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors"
    encoder = tiny_dir / "IP-Adapter/sdxl_models/image_encoder"
    write_model_set(toml, name="hub", base="nobody/no-such-sdxl", ip_adapter=str(adapter), image_encoder=str(encoder))
    with pytest.raises(ModelSetError, match="HF_HUB_OFFLINE"):  # tests/conftest.py sets it
        Renderer.load(read_model_set(toml), device="cpu")


def test_encode_is_deterministic_and_independent_of_its_batch(renderer_for: Renderers) -> None:
    for key in ("default", "ip-adapter-plus_sdxl_vit-h.safetensors"):
        renderer = renderer_for(key)
        images = [reference_image(8), reference_image(9)]
        together = renderer.encode(images)
        alone = [renderer.encode([image])[0] for image in images]
        assert all(torch.equal(a, b) for a, b in zip(together, alone, strict=True))
        assert together[0].device.type == "cpu" and tuple(together[0].shape) == renderer.embed_shape
    assert renderer_for("default").encoder_id != renderer_for("ip-adapter-plus_sdxl_vit-h.safetensors").encoder_id


def test_several_references_concatenate_their_tokens(renderer_for: Renderers) -> None:
    renderer = renderer_for("default")
    a, b = reference_image(10), reference_image(11)
    both = _render(renderer, job(), [a, b])
    assert np.abs(both - _render(renderer, job(), [a])).max() > 1e-3
    assert np.abs(both - _render(renderer, job(), [b, a])).max() > 0  # order matters: tokens concatenate in order
    renderer.pipe.set_ip_adapter_scale(0.6)
    from_images = _diffusers_image(renderer.pipe, ip_adapter_image=[[a, b]])
    assert np.abs(both - from_images).max() <= 1e-5


def _four_jobs(renderer: Any) -> list[tuple[Any, list[torch.Tensor]]]:
    embeds = renderer.encode([reference_image(20 + i) for i in range(4)])
    prompts = ["a castle", "a forest", "", "the sea at night"]
    return [(job(prompt=prompts[i], seed=100 + i, negative_prompt="blurry" * (i % 2)), [embeds[i]]) for i in range(4)]


@pytest.mark.parametrize("key", ["default", "ip-adapter-plus_sdxl_vit-h.safetensors"])
def test_a_batch_of_four_jobs_with_four_references_equals_their_single_runs(renderer_for: Renderers, key: str) -> None:
    renderer = renderer_for(key)
    items = _four_jobs(renderer)
    singles = [renderer.generate_batch([item], output="np")[0] for item in items]
    batched = renderer.generate_batch(items, output="np")
    assert max(float(np.abs(s - b).max()) for s, b in zip(singles, batched, strict=True)) <= 1e-4
    assert min(float(np.abs(singles[0] - s).max()) for s in singles[1:]) > 1e-3  # they are different jobs


def test_naive_diffusers_batching_mixes_the_references_up(renderer_for: Renderers) -> None:
    """Why generate_batch assembles the embeddings itself (upstream diffusers #9813)."""
    renderer = renderer_for("default")
    embeds = renderer.encode([reference_image(24), reference_image(25)])
    items = [(job(prompt="a castle", seed=100), [embeds[0]]), (job(prompt="a forest", seed=101), [embeds[1]])]
    singles = [renderer.generate_batch([item], output="np")[0] for item in items]
    negatives = torch.zeros(2, 1, renderer.embed_shape[0])
    positives = torch.stack([torch.stack(embeds) for _, embeds in items])
    renderer.pipe.set_ip_adapter_scale(items[0][0].ip_adapter_scale)
    naive = renderer.pipe(
        prompt=[p.prompt for p, _ in items],
        width=64,
        height=64,
        num_inference_steps=4,
        guidance_scale=5.0,
        ip_adapter_image_embeds=[torch.cat([negatives, positives])],
        generator=[torch.Generator().manual_seed(p.seed) for p, _ in items],
        output_type="np",
    ).images
    assert max(float(np.abs(s - n).max()) for s, n in zip(singles, naive, strict=True)) > 1e-3


def test_a_batch_refuses_jobs_that_cannot_share_a_forward_pass(renderer_for: Renderers) -> None:
    renderer = renderer_for("default")
    embeds = renderer.encode([reference_image(30), reference_image(31)])
    with pytest.raises(ValueError, match="batch_key"):
        renderer.generate_batch([(job(), embeds[:1]), (job(steps=5), embeds[:1])])
    with pytest.raises(ValueError, match="reference counts"):
        renderer.generate_batch([(job(), embeds[:1]), (job(), embeds)])


def test_on_step_is_called_after_every_step_and_can_cancel_the_job(renderer_for: Renderers) -> None:
    renderer = renderer_for("default")
    embeds = renderer.encode([reference_image(12)])
    steps: list[int] = []
    renderer.generate(job(steps=3), embeds, on_step=steps.append)
    assert steps == [0, 1, 2]

    def cancel(step: int) -> None:
        if step == 1:
            raise JobCanceled("canceled")

    with pytest.raises(JobCanceled):
        renderer.generate(job(), embeds, on_step=cancel)


@pytest.mark.parametrize("scheduler", ["euler", "euler_a", "dpmpp_2m", "dpmpp_2m_karras", "ddim"])
def test_every_scheduler_renders_and_is_seed_deterministic(renderer_for: Renderers, scheduler: str) -> None:
    renderer = renderer_for("default")
    embeds = renderer.encode([reference_image(13)])
    first = renderer.generate_batch([(job(scheduler=scheduler), embeds)], output="np")[0]
    again = renderer.generate_batch([(job(scheduler=scheduler), embeds)], output="np")[0]
    assert np.array_equal(first, again)
    assert type(renderer.pipe.scheduler).__name__.startswith(
        {"euler": "EulerDiscrete", "euler_a": "EulerAncestral", "dpmpp_2m": "DPMSolverMultistep"}.get(
            scheduler.removesuffix("_karras"), "DDIM"
        )
    )


def test_instantstyle_presets_scale_only_their_blocks(renderer_for: Renderers) -> None:
    renderer = renderer_for("default")
    embeds = renderer.encode([reference_image(14)])
    images = {
        s: renderer.generate_batch([(job(ip_adapter_scale=s), embeds)], output="np")[0]
        for s in ("style", "style_and_layout", 0.0)
    }
    assert np.abs(images["style"] - images[0.0]).max() > 0
    assert np.abs(images["style"] - images["style_and_layout"]).max() > 0
    scales = {
        name: proc.scale[0] for name, proc in renderer.pipe.unet.attn_processors.items() if hasattr(proc, "scale")
    }
    assert scales["down_blocks.2.attentions.1.transformer_blocks.0.attn2.processor"] == 0.0  # last run: 0.0
    renderer.generate_batch([(job(ip_adapter_scale="style"), embeds)], output="np")
    scales = {
        name: proc.scale[0] for name, proc in renderer.pipe.unet.attn_processors.items() if hasattr(proc, "scale")
    }
    assert {name for name, s in scales.items() if s} == {
        "up_blocks.0.attentions.1.transformer_blocks.0.attn2.processor"
    }


def test_nan_output_is_refused_not_returned_as_a_black_image(renderer_for: Renderers) -> None:
    renderer = renderer_for("ip-adapter_sdxl_vit-h.bin")
    weight = renderer.pipe.vae.post_quant_conv.weight
    saved = weight.detach().clone()
    with torch.no_grad():
        weight.fill_(float("nan"))
    try:
        with pytest.raises(ModelSetError, match="NaN"):
            renderer.generate(job(), renderer.encode([reference_image(15)]))
    finally:
        with torch.no_grad():
            weight.copy_(saved)


def test_compile_wraps_the_unet_with_torch_compile(tiny_sets: dict[str, Path]) -> None:
    from worker.pipeline import Renderer

    # Compilation itself happens at the first call (minutes on a CPU); loading only arms it.
    renderer = Renderer.load(read_model_set(tiny_sets["default"]), device="cpu", compile=True)
    assert renderer.pipe.unet._compiled_call_impl is not None


def test_without_classifier_free_guidance_batches_still_equal_single_runs(renderer_for: Renderers) -> None:
    renderer = renderer_for("ip-adapter-plus_sdxl_vit-h.safetensors")
    embeds = renderer.encode([reference_image(70), reference_image(71)])
    items = [(job(guidance_scale=1.0, seed=s), [e]) for s, e in zip((1, 2), embeds, strict=True)]
    singles = [renderer.generate_batch([item], output="np")[0] for item in items]
    batched = renderer.generate_batch(items, output="np")
    assert max(float(np.abs(s - b).max()) for s, b in zip(singles, batched, strict=True)) <= 1e-4
