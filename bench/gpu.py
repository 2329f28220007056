"""GPU benchmark: full-size SDXL + `ip-adapter_sdxl` (ViT-bigG), random weights built in memory.

Nothing is downloaded: the SDXL base UNet, VAE and text encoders and the ViT-bigG image
encoder are built from their public configs (written out below) with random weights, which
cost the same compute as the real ones. 1024x1024, 30 steps, classifier-free guidance.

- baseline: a plain diffusers fp16 + SDPA pipeline call per image (`ip_adapter_image=`).
- ipab: its worker path, `worker.pipeline.Renderer` around the same in-memory pipeline
  (embedding encoded once, then `generate_batch`), at batch 1, 2, 4 and 8, eager and with
  `torch.compile` (the UNet compiled as `Renderer.load(compile=True)` does), in fp16 and
  again in bf16 (a pipeline rebuilt in that dtype).

Reported per configuration: s/image, images/s, images/min, peak GPU memory, achieved TFLOP/s and
utilisation against the FLOPs per image counted with `torch.utils.flop_counter` (one
baseline image) and the device's dense fp16 peak. Written as JSON to `--out`.

    python -m bench.gpu --out gpu.json            # on a GPU machine, < 8 min on an H100
    python -m bench.gpu --smoke --out smoke.json  # tiny configs on the CPU, seconds
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

# --- public configs (stabilityai/stable-diffusion-xl-base-1.0, h94/IP-Adapter sdxl_models) ---------

SDXL_UNET: Final[dict[str, Any]] = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "time_embedding_type": "positional",
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SDXL_VAE: Final[dict[str, Any]] = {
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "in_channels": 3,
    "out_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "sample_size": 1024,
    "scaling_factor": 0.13025,
    "force_upcast": True,
}
_CLIP_TEXT_COMMON: Final[dict[str, Any]] = {
    "vocab_size": 49408,
    "max_position_embeddings": 77,
    "layer_norm_eps": 1e-05,
    "bos_token_id": 0,
    "eos_token_id": 2,
    "pad_token_id": 1,
}
SDXL_TEXT_ENCODER: Final[dict[str, Any]] = {  # CLIP ViT-L/14 text tower
    **_CLIP_TEXT_COMMON,
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_attention_heads": 12,
    "num_hidden_layers": 12,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}
SDXL_TEXT_ENCODER_2: Final[dict[str, Any]] = {  # OpenCLIP ViT-bigG/14 text tower, with projection
    **_CLIP_TEXT_COMMON,
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_attention_heads": 20,
    "num_hidden_layers": 32,
    "projection_dim": 1280,
    "hidden_act": "gelu",
}
VIT_BIGG_VISION: Final[dict[str, Any]] = {  # h94/IP-Adapter sdxl_models/image_encoder
    "hidden_size": 1664,
    "intermediate_size": 8192,
    "num_attention_heads": 16,
    "num_hidden_layers": 48,
    "patch_size": 14,
    "image_size": 224,
    "projection_dim": 1280,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-05,
}
EULER: Final[dict[str, Any]] = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "interpolation_type": "linear",
    "use_karras_sigmas": False,
}
ADAPTER_TOKENS: Final = 4  # ip-adapter_sdxl: ImageProjModel, 4 tokens per image
COMPILE_RESERVE_S: Final = 150.0

# --- tiny configs for --smoke (same structure, small widths) ----------------------------------------

SMOKE_UNET: Final[dict[str, Any]] = {
    **SDXL_UNET,
    "attention_head_dim": [2, 4, 4],
    "block_out_channels": [32, 64, 64],
    "cross_attention_dim": 80,
    "addition_time_embed_dim": 8,
    "projection_class_embeddings_input_dim": 6 * 8 + 48,
    "transformer_layers_per_block": [1, 1, 1],
    "sample_size": 8,
}
SMOKE_VAE: Final[dict[str, Any]] = {**SDXL_VAE, "block_out_channels": [32, 32, 64, 64], "sample_size": 64}
_SMOKE_TEXT: Final = {"intermediate_size": 64, "num_attention_heads": 2, "num_hidden_layers": 2}
SMOKE_TEXT_ENCODER: Final = {**SDXL_TEXT_ENCODER, **_SMOKE_TEXT, "hidden_size": 32, "projection_dim": 32}
SMOKE_TEXT_ENCODER_2: Final = {**SDXL_TEXT_ENCODER_2, **_SMOKE_TEXT, "hidden_size": 48, "projection_dim": 48}
SMOKE_VISION: Final = {
    **VIT_BIGG_VISION,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_attention_heads": 2,
    "num_hidden_layers": 2,
    "patch_size": 8,
    "image_size": 32,
    "projection_dim": 40,
}

# Dense fp16/bf16 tensor-core peak (no sparsity), TFLOP/s, by device name.
PEAK_TFLOPS: Final = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "L40S": 362.0, "A10": 125.0, "L4": 121.0}


@dataclass(frozen=True)
class Plan:
    """What one run does: configs, sizes, repetitions."""

    smoke: bool
    device: torch.device
    dtype: torch.dtype
    size_px: int
    steps: int
    reps: int  # timed images per configuration (rounded up to whole batches)
    batches: tuple[int, ...]
    compile_backend: str
    other_dtypes: tuple[torch.dtype, ...] = ()  # ipab again in these (bf16 next to fp16)


def _plan(smoke: bool) -> Plan:
    if smoke:
        return Plan(True, torch.device("cpu"), torch.float32, 64, 2, 2, (1, 2), "eager", (torch.bfloat16,))
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu: no CUDA device; run it on a GPU machine, or use --smoke here")
    return Plan(False, torch.device("cuda"), torch.float16, 1024, 30, 8, (1, 2, 4, 8), "inductor", (torch.bfloat16,))


# --- building the random-weight pipeline --------------------------------------------------------


def _init_small(module: torch.nn.Module) -> None:
    """Transformer-style init (N(0, 0.02), zero biases): activations stay finite in fp16 over 30 steps."""
    with torch.no_grad():
        for sub in module.modules():
            if isinstance(sub, torch.nn.Linear | torch.nn.Conv2d | torch.nn.Embedding):
                sub.weight.normal_(0.0, 0.02)
                bias = getattr(sub, "bias", None)
                if bias is not None:
                    bias.zero_()


def _tokenizer() -> Any:
    """A byte-level CLIP tokenizer (every byte one token), built in memory: nothing to download."""
    from transformers import CLIPTokenizer

    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    codes = {b: b for b in printable}
    codes.update({b: 256 + i for i, b in enumerate(b for b in range(256) if b not in codes)})
    symbols = [chr(codes[b]) for b in range(256)]
    vocab = {s: i for i, s in enumerate(symbols)} | {s + "</w>": 256 + i for i, s in enumerate(symbols)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token="<|endoftext|>", model_max_length=77)


def _adapter_state(unet: Any, *, embed_dim: int, dtype: torch.dtype) -> dict[str, dict[str, torch.Tensor]]:
    """Random `ip-adapter_sdxl` weights in the h94 layout (image_proj + to_k_ip/to_v_ip per attn2)."""
    cross = int(unet.config.cross_attention_dim)

    def draw(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape) * 0.02).to(dtype)

    image_proj = {
        "proj.weight": draw(ADAPTER_TOKENS * cross, embed_dim),
        "proj.bias": torch.zeros(ADAPTER_TOKENS * cross, dtype=dtype),
        "norm.weight": torch.ones(cross, dtype=dtype),
        "norm.bias": torch.zeros(cross, dtype=dtype),
    }
    ip_adapter: dict[str, torch.Tensor] = {}
    for index, name in enumerate(unet.attn_processors):
        if name.endswith("attn2.processor"):
            width = unet.get_submodule(name.removesuffix(".processor")).to_k.out_features
            ip_adapter[f"{index}.to_k_ip.weight"] = draw(width, cross)
            ip_adapter[f"{index}.to_v_ip.weight"] = draw(width, cross)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def _models(plan: Plan) -> dict[str, Any]:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import (
        CLIPTextConfig,
        CLIPTextModel,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    unet_cfg, vae_cfg = (SMOKE_UNET, SMOKE_VAE) if plan.smoke else (SDXL_UNET, SDXL_VAE)
    text_cfg = SMOKE_TEXT_ENCODER if plan.smoke else SDXL_TEXT_ENCODER
    text2_cfg = SMOKE_TEXT_ENCODER_2 if plan.smoke else SDXL_TEXT_ENCODER_2
    vision_cfg = SMOKE_VISION if plan.smoke else VIT_BIGG_VISION
    unet_class: Any = UNet2DConditionModel  # diffusers is untyped
    vae_class: Any = AutoencoderKL
    torch.manual_seed(0)
    # Built on the device itself: initialising billions of weights on the CPU takes minutes.
    with torch.device(plan.device):
        models: dict[str, Any] = {
            "unet": unet_class(**unet_cfg),
            "vae": vae_class(**vae_cfg),
            "text_encoder": CLIPTextModel(CLIPTextConfig(**text_cfg)),
            "text_encoder_2": CLIPTextModelWithProjection(CLIPTextConfig(**text2_cfg)),
            "image_encoder": CLIPVisionModelWithProjection(CLIPVisionConfig(**vision_cfg)),
        }
    for model in models.values():
        _init_small(model)
        model.to(plan.dtype).eval()
    return models


def build_pipeline(plan: Plan) -> Any:
    """The SDXL + ip-adapter_sdxl pipeline with random weights, on the plan's device and dtype."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPImageProcessor

    m = _models(plan)
    tokenizer = _tokenizer()
    pipeline_class: Any = StableDiffusionXLPipeline
    scheduler_class: Any = EulerDiscreteScheduler
    pipe = pipeline_class(
        vae=m["vae"],
        text_encoder=m["text_encoder"],
        text_encoder_2=m["text_encoder_2"],
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=m["unet"],
        scheduler=scheduler_class(**EULER),
        force_zeros_for_empty_prompt=True,
    )
    size = int(m["image_encoder"].config.image_size)
    pipe.register_modules(
        image_encoder=m["image_encoder"], feature_extractor=CLIPImageProcessor(size=size, crop_size=size)
    )
    embed_dim = int(m["image_encoder"].config.projection_dim)
    state = _adapter_state(pipe.unet, embed_dim=embed_dim, dtype=plan.dtype)
    pipe.load_ip_adapter(state, subfolder="", weight_name="", image_encoder_folder=None)
    pipe.to(plan.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def make_renderer(pipe: Any) -> Any:
    """ipab's `Renderer` around the in-memory pipeline (what `Renderer.load` builds from files)."""
    from shared.model_set import ModelSetConfig
    from worker.pipeline import Renderer
    from worker.weights import AdapterInfo

    nowhere = Path("/nonexistent")
    config = ModelSetConfig(
        name="bench-gpu-random", base="random", base_kind="diffusers", base_config=None,
        ip_adapter=nowhere / "random.safetensors", image_encoder=nowhere, source=nowhere / "model-set.toml",
    )  # fmt: skip
    unet = pipe.unet
    info = AdapterInfo(
        kind="plain",
        embed_dim=int(pipe.image_encoder.config.projection_dim),
        tokens=ADAPTER_TOKENS,
        cross_attention_dim=int(unet.config.cross_attention_dim),
        layers=sum(1 for name in unet.attn_processors if name.endswith("attn2.processor")),
    )
    return Renderer(
        pipe=pipe,
        encoder=pipe.image_encoder,
        processor=pipe.feature_extractor,
        info=info,
        config=config,
        encoder_id="random-vit-bigG",
    )


# --- measuring --------------------------------------------------------------------------------------


def _sync(plan: Plan) -> None:
    if plan.device.type == "cuda":
        torch.cuda.synchronize()


def _reference(seed: int) -> Any:
    from PIL import Image

    gen = torch.Generator().manual_seed(seed)
    pixels = (torch.rand(224, 224, 3, generator=gen) * 255).to(torch.uint8).numpy()
    return Image.fromarray(pixels)


def _params(plan: Plan, index: int) -> Any:
    from shared.spec import parse_params

    raw = {"prompt": f"a photo of a cat, variation {index}", "seed": index, "steps": plan.steps}
    return parse_params({**raw, "width": plan.size_px, "height": plan.size_px, "guidance_scale": 5.0})


def baseline_call(pipe: Any, plan: Plan, index: int) -> Any:
    """One image the way a diffusers user writes it."""
    pipe.set_ip_adapter_scale(0.6)
    return pipe(
        prompt=f"a photo of a cat, variation {index}",
        ip_adapter_image=_reference(index % 2),
        width=plan.size_px,
        height=plan.size_px,
        num_inference_steps=plan.steps,
        guidance_scale=5.0,
        generator=torch.Generator("cpu").manual_seed(index),
    ).images


def count_flops(fn: Callable[[], Any]) -> float:
    """FLOPs of one call, as `torch.utils.flop_counter` counts them (matmuls, convolutions, attention)."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())


def _time(plan: Plan, images_per_call: int, call: Callable[[int], Any]) -> dict[str, float | None]:
    """One warm-up call, then enough calls for `plan.reps` images; s/image and peak memory."""
    calls = max(1, -(-plan.reps // images_per_call))
    call(0)
    _sync(plan)
    if plan.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for i in range(calls):
        call(i + 1)
    _sync(plan)
    elapsed_s = time.perf_counter() - t0
    s_per_image = elapsed_s / (calls * images_per_call)
    peak = torch.cuda.max_memory_allocated() / 2**30 if plan.device.type == "cuda" else None
    images = calls * images_per_call
    figures: dict[str, float | None] = {
        "s_per_image": s_per_image,
        "images_per_min": 60 / s_per_image,
        "images_per_s": 1 / s_per_image,
        "peak_mem_gib": peak,
        "images": images,
    }
    return figures


def _ipab_call(renderer: Any, plan: Plan, batch: int) -> Callable[[int], Any]:
    embeds = [renderer.encode([_reference(i)])[0] for i in range(2)]

    def call(i: int) -> Any:
        items = [(_params(plan, i * batch + j), [embeds[(i * batch + j) % 2]]) for j in range(batch)]
        return renderer.generate_batch(items)

    return call


def _peak_tflops(plan: Plan) -> float | None:
    if plan.device.type != "cuda":
        return None
    name = torch.cuda.get_device_name()
    return next((peak for key, peak in PEAK_TFLOPS.items() if key in name), None)


def _configs(
    pipe: Any, renderer: Any, plan: Plan, *, baseline: bool = True
) -> list[tuple[str, int, bool, Callable[[int], Any]]]:
    dtype = str(plan.dtype).removeprefix("torch.")
    runs: list[tuple[str, int, bool, Callable[[int], Any]]] = []
    if baseline:
        runs.append((f"diffusers baseline {dtype}", 1, False, lambda i: baseline_call(pipe, plan, i)))
    runs += [(f"ipab batch {b} {dtype}", b, False, _ipab_call(renderer, plan, b)) for b in plan.batches]
    runs += [(f"ipab batch {b} {dtype} compiled", b, True, _ipab_call(renderer, plan, b)) for b in plan.batches]
    return runs


def _free(plan: Plan) -> None:
    if plan.device.type == "cuda":
        torch.cuda.empty_cache()


@dataclass
class _Sweep:
    """Times configurations against one time budget; compiles each pipeline once, when due."""

    plan: Plan
    t_start: float
    budget_s: float
    flops: float
    peak: float | None

    def measure(self, pipe: Any, configs: list[tuple[str, int, bool, Callable[[int], Any]]]) -> list[dict[str, Any]]:
        """Figures of each configuration of one pipeline (skipped once the budget is spent)."""
        results: list[dict[str, Any]] = []
        compiled = False
        for name, batch, compile_, call in configs:
            entry: dict[str, Any] = {"name": name, "batch": batch, "compile": compile_, "dtype": str(self.plan.dtype)}
            # A compile takes minutes on SDXL: start one only with that much budget left.
            reserve_s = COMPILE_RESERVE_S if compile_ and not compiled and not self.plan.smoke else 0.0
            if time.perf_counter() - self.t_start + reserve_s > self.budget_s:
                results.append({**entry, "skipped": f"time budget of {self.budget_s:.0f} s spent"})
                continue
            if compile_ and not compiled:
                pipe.unet.compile(fullgraph=False, backend=self.plan.compile_backend)  # as Renderer.load(compile=True)
                compiled = True
            results.append(self._timed(entry, batch, call))
        return results

    def _timed(self, entry: dict[str, Any], batch: int, call: Callable[[int], Any]) -> dict[str, Any]:
        try:
            t0 = time.perf_counter()
            entry.update(_time(self.plan, batch, call))
            entry["wall_s"] = time.perf_counter() - t0
        except Exception as e:  # one failing configuration must not lose the others' figures
            entry["error"] = f"{type(e).__name__}: {e}"[:500]
        if "s_per_image" in entry:
            entry["tflops_achieved"] = self.flops / entry["s_per_image"] / 1e12
            entry["utilisation"] = entry["tflops_achieved"] / self.peak if self.peak else None
        return entry


def run(plan: Plan, *, budget_s: float) -> dict[str, Any]:
    """Every configuration that fits the time budget; figures as a JSON-able dict.

    First stock diffusers (the anchor) and ipab in the plan's dtype, eager and compiled; then
    ipab again in each of `plan.other_dtypes` (a pipeline rebuilt in that dtype).
    """
    t_start = time.perf_counter()
    pipe = build_pipeline(plan)
    renderer = make_renderer(pipe)
    build_s = time.perf_counter() - t_start
    flops = count_flops(lambda: baseline_call(pipe, plan, 0))
    sweep = _Sweep(plan=plan, t_start=t_start, budget_s=budget_s, flops=flops, peak=_peak_tflops(plan))
    results = sweep.measure(pipe, _configs(pipe, renderer, plan))
    for dtype in plan.other_dtypes:
        del pipe, renderer
        _free(plan)
        other = dataclasses.replace(plan, dtype=dtype)
        pipe = build_pipeline(other)
        renderer = make_renderer(pipe)
        sweep.plan = other
        results += sweep.measure(pipe, _configs(pipe, renderer, other, baseline=False))
    base = results[0].get("s_per_image")
    for entry in results:
        if base and "s_per_image" in entry:
            entry["speedup_vs_baseline"] = base / entry["s_per_image"]
    return {
        "smoke": plan.smoke,
        "device": torch.cuda.get_device_name() if plan.device.type == "cuda" else platform.processor() or "cpu",
        "dtype": str(plan.dtype).removeprefix("torch."),
        "other_dtypes": [str(d).removeprefix("torch.") for d in plan.other_dtypes],
        "size_px": plan.size_px,
        "steps": plan.steps,
        "guidance_scale": 5.0,
        "tflop_per_image": flops / 1e12,
        "peak_tflops_assumed": sweep.peak,
        "build_s": build_s,
        "total_s": time.perf_counter() - t_start,
        "versions": _versions(),
        "configs": results,
    }


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"torch": torch.__version__, "diffusers": diffusers.__version__, "transformers": transformers.__version__}


def main() -> None:
    """Command line: `python -m bench.gpu --out FILE [--smoke] [--budget-s S]`."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON figures")
    parser.add_argument("--smoke", action="store_true", help="tiny configs on the CPU, to prove the script works")
    parser.add_argument("--budget-s", type=float, default=420.0, help="skip configurations that would start after this")
    args = parser.parse_args()
    figures = run(_plan(args.smoke), budget_s=args.budget_s)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2))
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
