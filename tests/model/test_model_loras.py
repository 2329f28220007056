"""Model-set LoRAs: fused once at load (both layouts diffusers reads), no PEFT layer left, the IP-Adapter
kept; pickles and LoRAs that do not fit refused by name; a fast set equals plain diffusers."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from shared.errors import InvalidInput, ModelSetError
from shared.model_set import read_model_set, write_model_set
from tests.model.conftest import job, reference_image

Renderers = Callable[[str], Any]
FAST = {"scheduler": "tcd", "guidance_scale": 0.0}  # the tiny fast set's defaults (steps 4 as job())
ETA = 0.3
QUERY = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"


def _fast_set(tmp_path: Path, tiny_dir: Path, lora: Path, **overrides: Any) -> Path:
    toml = tmp_path / "model-set.toml"
    values: dict[str, Any] = {
        "name": "fast-test",
        "base": str(tiny_dir / "base"),
        "ip_adapter": str(tiny_dir / "IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors"),
        "image_encoder": str(tiny_dir / "IP-Adapter/sdxl_models/image_encoder"),
        "loras": [(str(lora), 1.0)],
    }
    write_model_set(toml, **{**values, **overrides})
    return toml


def _peft_layers(model: Any) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return sum(1 for m in model.modules() if isinstance(m, BaseTunerLayer))


def _render(renderer: Any, params: Any, seed: int = 40) -> np.ndarray:
    embeds = renderer.encode([reference_image(seed)])
    return np.asarray(renderer.generate_batch([(params, embeds)], output="np")[0])


def _to_8bit(image: np.ndarray) -> np.ndarray:
    return (image * 255).round().astype(np.int16)


def test_a_fast_set_equals_plain_diffusers_with_the_lora_loaded_and_fused(
    tiny_dir: Path, renderer_for: Renderers
) -> None:
    from diffusers import StableDiffusionXLPipeline, TCDScheduler

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_dir / "base")
    pipe.load_ip_adapter(
        str(tiny_dir / "IP-Adapter"),
        subfolder="sdxl_models",
        weight_name="ip-adapter_sdxl.safetensors",
        image_encoder_folder="image_encoder",
    )
    pipe.load_lora_weights(str(tiny_dir / "loras"), weight_name="tiny-tcd-lora.safetensors")
    pipe.fuse_lora()
    pipe.scheduler = TCDScheduler.from_config(pipe.scheduler.config)
    pipe.set_ip_adapter_scale(0.6)
    pipe.set_progress_bar_config(disable=True)
    params = job(**FAST)
    expected = pipe(
        prompt=params.prompt,
        ip_adapter_image=reference_image(41),
        width=params.width,
        height=params.height,
        num_inference_steps=params.steps,
        guidance_scale=params.guidance_scale,
        eta=ETA,
        generator=torch.Generator().manual_seed(params.seed),
        output_type="np",
    ).images[0]
    ours = _render(renderer_for("fast"), params, seed=41)
    diff = int(np.abs(_to_8bit(ours) - _to_8bit(np.asarray(expected))).max())
    print(f"fast set vs plain diffusers: max pixel difference {diff} (of 255)")
    assert diff <= 1


@pytest.mark.parametrize("key", ["fast", "fast.kohya"])
def test_a_lora_is_fused_and_leaves_no_peft_layer_and_the_adapters_processors_in_place(
    renderer_for: Renderers, key: str
) -> None:
    renderer = renderer_for(key)
    pipe = renderer.pipe
    assert sum(_peft_layers(m) for m in (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)) == 0
    processors = {type(p).__name__ for name, p in pipe.unet.attn_processors.items() if "attn2" in name}
    assert processors == {"IPAdapterAttnProcessor2_0"}
    # Fused: the UNet's weights moved from the base's; the adapter still follows its reference.
    base = renderer_for("default").pipe.unet.get_submodule(QUERY).weight
    assert float((pipe.unet.get_submodule(QUERY).weight - base).abs().max().detach()) > 1e-3
    one, other = _render(renderer, job(**FAST), seed=42), _render(renderer, job(**FAST), seed=43)
    assert np.abs(one - other).max() > 1e-3


def test_the_diffusers_and_kohya_layouts_of_one_lora_fuse_into_the_same_unet(
    renderer_for: Renderers, tiny_dir: Path
) -> None:
    peft, kohya = renderer_for("fast").pipe, renderer_for("fast.kohya").pipe
    for name, weight in peft.unet.state_dict().items():
        assert torch.allclose(weight, kohya.unet.state_dict()[name], atol=1e-6), name
    # W + B @ A at scale 1: the fused weight is the base's plus the LoRA's product, exactly.
    lora = load_file(str(tiny_dir / "loras/tiny-tcd-lora.safetensors"))
    base = renderer_for("default").pipe.unet.get_submodule(QUERY).weight
    delta = lora[f"unet.{QUERY}.lora_B.weight"] @ lora[f"unet.{QUERY}.lora_A.weight"]
    assert torch.allclose(peft.unet.get_submodule(QUERY).weight, base + delta, atol=1e-6)
    # The diffusers file has text-encoder layers too, and they were fused; kohya's has none.
    q_proj = "encoder.layers.0.self_attn.q_proj"
    default_te = renderer_for("default").pipe.text_encoder.get_submodule(q_proj).weight
    assert float((peft.text_encoder.get_submodule(q_proj).weight - default_te).abs().max().detach()) > 1e-3
    assert torch.equal(kohya.text_encoder.get_submodule(q_proj).weight, default_te)


def _kohya_pair(stem: str, fan_in: int, fan_out: int, gen: torch.Generator, *, conv: bool = False) -> dict[str, Any]:
    down_shape, up_shape = ((4, fan_in, 3, 3), (fan_out, 4, 1, 1)) if conv else ((4, fan_in), (fan_out, 4))
    return {
        f"{stem}.lora_down.weight": torch.randn(*down_shape, generator=gen) * 0.05,
        f"{stem}.lora_up.weight": torch.randn(*up_shape, generator=gen) * 0.05,
        f"{stem}.alpha": torch.tensor(2.0),  # alpha != rank: kohya's scaling must be applied
    }


def test_a_kohya_lora_with_text_encoder_attention_mlp_and_conv_layers_fuses_as_plain_diffusers_fuses_it(
    tmp_path: Path, tiny_dir: Path
) -> None:
    """kohya's sd-scripts train both text encoders' attention and MLP (`lora_te1_`/`lora_te2_`) and, for
    LoCon-style files, the UNet's convolutions; diffusers converts their MLP keys to `lora_linear_layer`."""
    from diffusers import StableDiffusionXLPipeline

    from worker.pipeline import Renderer

    gen = torch.Generator().manual_seed(5)
    state: dict[str, Any] = dict(load_file(str(tiny_dir / "loras/tiny-kohya-lora.safetensors")))
    for te, component in (("te1", "text_encoder"), ("te2", "text_encoder_2")):
        config = json.loads((tiny_dir / f"base/{component}/config.json").read_text())
        width, inner = config["hidden_size"], config["intermediate_size"]
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            state |= _kohya_pair(f"lora_{te}_text_model_encoder_layers_0_self_attn_{proj}", width, width, gen)
        state |= _kohya_pair(f"lora_{te}_text_model_encoder_layers_0_mlp_fc1", width, inner, gen)
        state |= _kohya_pair(f"lora_{te}_text_model_encoder_layers_0_mlp_fc2", inner, width, gen)
    state |= _kohya_pair(
        "lora_unet_input_blocks_1_0_in_layers_2", 32, 32, gen, conv=True
    )  # down_blocks.0.resnets.0.conv1
    lora = _bad_lora(tmp_path / "style-kohya.safetensors", state)
    ours = Renderer.load(read_model_set(_fast_set(tmp_path, tiny_dir, lora)), device="cpu", dtype="float32").pipe

    plain = StableDiffusionXLPipeline.from_pretrained(tiny_dir / "base")
    base_fc1 = plain.text_encoder_2.get_submodule("text_model.encoder.layers.0.mlp.fc1").weight.clone()
    plain.load_lora_weights(str(tmp_path), weight_name=lora.name)
    plain.fuse_lora()
    for component in ("unet", "text_encoder", "text_encoder_2"):
        theirs = {k.replace(".base_layer", ""): v for k, v in getattr(plain, component).state_dict().items()}
        for name, weight in getattr(ours, component).state_dict().items():
            if name in theirs:  # (the UNet's IP-Adapter weights are ours alone)
                assert torch.allclose(weight, theirs[name], atol=1e-6), f"{component}.{name}"
    fused_fc1 = ours.text_encoder_2.get_submodule("text_model.encoder.layers.0.mlp.fc1").weight
    assert float((fused_fc1 - base_fc1).abs().max().detach()) > 1e-4  # the MLP layers were fused, not skipped


def test_a_lora_scale_scales_what_is_fused(tmp_path: Path, tiny_dir: Path, renderer_for: Renderers) -> None:
    from worker.pipeline import Renderer

    lora = tiny_dir / "loras/tiny-tcd-lora.safetensors"
    half = Renderer.load(read_model_set(_fast_set(tmp_path, tiny_dir, lora, loras=[(str(lora), 0.5)])), device="cpu")
    base = renderer_for("default").pipe.unet.get_submodule(QUERY).weight
    full = renderer_for("fast").pipe.unet.get_submodule(QUERY).weight
    assert torch.allclose(half.pipe.unet.get_submodule(QUERY).weight, base + 0.5 * (full - base), atol=1e-6)


def test_every_lora_of_a_set_is_fused_not_only_the_last(
    tmp_path: Path, tiny_dir: Path, renderer_for: Renderers
) -> None:
    """Two LoRAs add up: the same LoRA twice at 0.5 fuses as once at 1.0 (UNet and text encoder), and a
    second LoRA at scale 0 leaves the first one's change whole (loading the second must not unmerge it)."""
    from worker.pipeline import Renderer

    lora = tiny_dir / "loras/tiny-tcd-lora.safetensors"
    twin = tmp_path / "twin.safetensors"
    save_file(load_file(str(lora)), str(twin))
    once = renderer_for("fast").pipe
    base = renderer_for("default").pipe
    for loras in ([(str(lora), 0.5), (str(twin), 0.5)], [(str(lora), 1.0), (str(twin), 0.0)]):
        both = Renderer.load(read_model_set(_fast_set(tmp_path, tiny_dir, lora, loras=loras)), device="cpu").pipe
        for component, module in (("unet", QUERY), ("text_encoder", "encoder.layers.0.self_attn.q_proj")):
            ours, theirs = (getattr(p, component).get_submodule(module).weight for p in (both, once))
            unchanged = getattr(base, component).get_submodule(module).weight
            assert float((theirs - unchanged).abs().max().detach()) > 1e-4, f"{component}: the LoRA changes nothing"
            assert torch.allclose(ours, theirs, atol=1e-5), f"{loras}: {component} is not both LoRAs fused"


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt", ".pth"])
def test_a_pickle_lora_is_refused_naming_the_key_and_the_file(tmp_path: Path, tiny_dir: Path, suffix: str) -> None:
    toml = _fast_set(tmp_path, tiny_dir, tmp_path / f"pixel-art{suffix}")
    with pytest.raises(ModelSetError, match=r"`loras\[0\]\.path` is 'pixel-art\..*': .* pickle") as e:
        read_model_set(toml)
    assert str(toml) in str(e.value) and ".safetensors" in str(e.value)


def _bad_lora(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({key: tensor.clone() for key, tensor in tensors.items()}, str(path))
    return path


def test_a_lora_that_does_not_fit_the_unet_is_refused_at_load_with_its_name(tmp_path: Path, tiny_dir: Path) -> None:
    from worker.pipeline import Renderer

    down, up = torch.randn(4, 7), torch.randn(64, 4)
    good = {f"unet.{QUERY}.lora_A.weight": torch.randn(4, 64), f"unet.{QUERY}.lora_B.weight": up}
    other = "unet.down_blocks.9.attentions.0.transformer_blocks.0.attn1.to_q"
    cases = {
        "wrong-shapes.safetensors": ({f"unet.{QUERY}.lora_A.weight": down, f"unet.{QUERY}.lora_B.weight": up}, "size"),
        "sd15-keys.safetensors": ({f"{other}.lora_A.weight": down, f"{other}.lora_B.weight": up}, "not found"),
        "half-fits.safetensors": ({**good, f"{other}.lora_A.weight": down, f"{other}.lora_B.weight": up}, "1 of its 2"),
        "not-a-lora.safetensors": ({"conv.weight": torch.randn(3)}, "lora"),
    }
    for name, (tensors, reason) in cases.items():
        lora = _bad_lora(tmp_path / name, tensors)
        with pytest.raises(ModelSetError, match=r"`loras\[0\]`") as e:
            Renderer.load(read_model_set(_fast_set(tmp_path, tiny_dir, lora)), device="cpu")
        assert name in str(e.value) and reason in str(e.value), str(e.value)


def test_a_fast_job_runs_one_unet_pass_a_step_with_the_embeddings_without_their_negative_half(
    renderer_for: Renderers,
) -> None:
    renderer = renderer_for("fast")
    calls: list[tuple[int, int]] = []

    def record(_module: Any, args: Any, kwargs: Any) -> None:
        image_embeds = kwargs["added_cond_kwargs"]["image_embeds"][0]
        calls.append((int(args[0].shape[0]), int(image_embeds.shape[0])))

    embeds = renderer.encode([reference_image(44), reference_image(45)])
    items = [(job(**FAST, seed=1), [embeds[0]]), (job(**FAST, seed=2), [embeds[1]])]
    handle = renderer.pipe.unet.register_forward_pre_hook(record, with_kwargs=True)
    try:
        renderer.generate_batch(items, output="np")
        assert calls == [(2, 2)] * 4  # 4 steps, one pass each, latents and embeddings for 2 jobs
        calls.clear()
        guided = [(job(scheduler="tcd", guidance_scale=1.5, seed=1), [embeds[0]])]
        renderer.generate_batch(guided, output="np")
        assert calls == [(2, 2)] * 4  # guidance > 1: negatives and positives for the one job
    finally:
        handle.remove()
    # Batched without guidance, each item is still its single run.
    singles = [renderer.generate_batch([item], output="np")[0] for item in items]
    batched = renderer.generate_batch(items, output="np")
    assert max(float(np.abs(s - b).max()) for s, b in zip(singles, batched, strict=True)) <= 1e-4


def test_a_fast_job_without_guidance_equals_passing_the_image_to_diffusers(renderer_for: Renderers) -> None:
    renderer = renderer_for("fast")
    params = job(**FAST)
    ours = _render(renderer, params, seed=46)
    renderer.pipe.set_ip_adapter_scale(0.6)
    from_image = renderer.pipe(
        prompt=params.prompt,
        ip_adapter_image=reference_image(46),
        width=params.width,
        height=params.height,
        num_inference_steps=params.steps,
        guidance_scale=0.0,
        eta=ETA,
        generator=torch.Generator().manual_seed(params.seed),
        output_type="np",
    ).images[0]
    assert np.array_equal(ours, from_image)


def test_the_worker_refuses_a_job_outside_the_sets_limits(renderer_for: Renderers) -> None:
    renderer = renderer_for("fast")
    embeds = renderer.encode([reference_image(47)])
    with pytest.raises(InvalidInput, match=r"`steps` is 30: must be 2 to 8 on model set 'tiny-fast'"):
        renderer.generate_batch([(job(**FAST, steps=30), embeds)])
    with pytest.raises(InvalidInput, match=r"`guidance_scale` is 5.0: must be 0 to 2"):
        renderer.generate_batch([(job(scheduler="tcd"), embeds)])


def test_the_sets_scheduler_options_reach_the_scheduler(renderer_for: Renderers) -> None:
    renderer = renderer_for("fast")
    params = job(**FAST)
    with_eta = _render(renderer, params, seed=48)
    renderer.config.rules.scheduler_options["eta"] = 0.0  # type: ignore[index]
    try:
        assert np.abs(_render(renderer, params, seed=48) - with_eta).max() > 1e-4
    finally:
        renderer.config.rules.scheduler_options["eta"] = ETA  # type: ignore[index]


def test_a_sets_timestep_spacing_reaches_the_config_of_the_scheduler_it_builds(
    tmp_path: Path, tiny_dir: Path, renderer_for: Renderers
) -> None:
    from worker.pipeline import Renderer

    toml = _fast_set(tmp_path, tiny_dir, tiny_dir, loras=[], defaults={"timestep_spacing": "trailing"})
    trailing = Renderer.load(read_model_set(toml), device="cpu", dtype="float32")
    _render(trailing, job(scheduler="euler"), seed=50)
    scheduler = trailing.pipe.scheduler
    assert (type(scheduler).__name__, scheduler.config.timestep_spacing) == ("EulerDiscreteScheduler", "trailing")
    # Trailing starts at the last training step, pure noise; the base's leading spacing does not.
    assert [int(t) for t in scheduler.timesteps] == [999, 749, 499, 249]
    default = renderer_for("default")
    _render(default, job(scheduler="euler"), seed=50)
    assert default.pipe.scheduler.config.timestep_spacing == "leading"
    assert [int(t) for t in default.pipe.scheduler.timesteps] == [751, 501, 251, 1]


@pytest.mark.parametrize("name", ["tcd", "lcm", "euler_trailing"])
def test_the_distilled_schedulers_are_the_diffusers_ones_and_seed_deterministic(
    renderer_for: Renderers, name: str
) -> None:
    renderer = renderer_for("fast")
    params = job(scheduler=name, guidance_scale=0.0)
    first = _render(renderer, params, seed=49)
    assert np.array_equal(first, _render(renderer, params, seed=49))
    scheduler = renderer.pipe.scheduler
    classes = {"tcd": "TCDScheduler", "lcm": "LCMScheduler", "euler_trailing": "EulerDiscreteScheduler"}
    assert type(scheduler).__name__ == classes[name]
    if name == "euler_trailing":
        assert scheduler.config.timestep_spacing == "trailing"
