"""GPU benchmark: full-size SDXL + `ip-adapter_sdxl` (ViT-bigG), random weights built in memory.

Nothing is downloaded: the SDXL base UNet, VAE and text encoders and the ViT-bigG image
encoder are built from their public configs (written out below) with random weights, which
cost the same compute as the real ones. 1024x1024, 30 steps, classifier-free guidance.

- baseline: a plain diffusers fp16 + SDPA pipeline call per image (`ip_adapter_image=`).
- ipab: its worker path, `worker.pipeline.Renderer` around the same in-memory pipeline
  (embedding encoded once, then `generate_batch`), at batch 1, 2, 4 and 8, eager and with
  `torch.compile` (the UNet compiled as `Renderer.load(compile=True)` does), in fp16 and
  again in bf16 (a pipeline rebuilt in that dtype).
- worker path (`worker_path` in the JSON): the same weights through the whole system, to show
  that it adds nothing to the pipeline's speed. The fp16 pipeline is written to disk in the
  public layouts (diffusers SDXL folder, h94's `ip-adapter_sdxl.safetensors` and image
  encoder folder, a model-set.toml); a private Redis and SeaweedFS, a SQLite database and ONE
  `ipab worker` process (cuda, fp16, `IPAB_BATCH_SIZE` 8) render 64 jobs of the sweep's size,
  steps and guidance, submitted with `submit_manifest` after one warm-up job. It runs after
  the eager configurations and before the compiled ones, only when the time budget holds its
  estimate (else `skipped` says why); a failure is recorded as `error` with the worker's log.
- fast set (`fast_set` in the JSON): a random LoRA of the public distilled LoRAs' size (rank 64 on
  the UNet's attention projections) written as a safetensors file and fused into the same pipeline by
  ipab's own loader (`worker.loras.fuse_loras`, as `Renderer.load` does for a model set's `loras`),
  then the fast set's settings (TCD, 4 steps, guidance 0: one UNet pass a step) at the largest batch,
  eager, against the default set's eager figure at that batch: `fast_over_default` in images/s.
  Random weights render noise either way; what is measured is the cost of 4 single passes
  against 30 double ones. It runs after the worker path (whose weights stay the plain base's).

Reported per configuration: s/image, images/s, images/min, peak GPU memory, achieved TFLOP/s and
utilisation against the FLOPs per image counted with `torch.utils.flop_counter` (one
baseline image) and the device's dense fp16 peak. For the worker path: every job succeeded
with its PNG in S3, wall seconds from submit to the last success, steady-state s/image (from
the end of the first pipeline call to the last finish), images/s, the `render_batch_size`s
seen, and `worker_over_pipeline`: its s/image over the in-process eager ipab at batch 8 of
the same run (goal 1.0). Written as JSON to `--out`.

    python -m bench.gpu --out gpu.json            # on a GPU machine, < 8 min on an H100
    python -m bench.gpu --smoke --out smoke.json  # tiny configs on the CPU, about a minute

`--smoke` runs the same code with tiny configs: fp32 on the CPU, batches 1 and 2, and the
worker path with 8 jobs at batch 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import platform
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import torch

from bench.common import (
    bench_settings,
    job_rows,
    log_tail,
    private_database,
    private_services,
    sessions_for,
    settings_env,
    start_worker,
    status_counts,
    steady_state_s_per_job,
    stop_workers,
    wait_for_batch,
    write_manifest,
    write_references,
)
from devkit.synth import ADAPTER_DIR, ENCODER_FOLDERS
from shared.db import JobStatus
from shared.model_set import write_model_set
from shared.settings import Settings
from shared.storage import ObjectStore

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
ADAPTER_SEED: Final = 0  # the adapter's own generator: drawn again, it gives the same weights to write out
GUIDANCE_SCALE: Final = 5.0
COMPILE_RESERVE_S: Final = 150.0
# The fast set, as `ipab models download --preset tcd` writes it (worker/download.py).
FAST_DEFAULTS: Final[dict[str, Any]] = {"scheduler": "tcd", "steps": 4, "guidance_scale": 0.0}
FAST_OPTIONS: Final[dict[str, Any]] = {"eta": 0.3}
FAST_LORA_RANK: Final = 64  # the size class of h1t/TCD-SDXL-LoRA and lcm-lora-sdxl (about 400 MB in fp16)
SMOKE_LORA_RANK: Final = 4
LORA_TARGETS: Final = (".to_q", ".to_k", ".to_v", ".to_out.0")

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
    worker_jobs: int = 0  # jobs through the worker path, at the largest batch (0: not run)


def _plan(smoke: bool) -> Plan:
    if smoke:
        cpu = torch.device("cpu")
        return Plan(True, cpu, torch.float32, 64, 2, 2, (1, 2), "eager", (torch.bfloat16,), worker_jobs=8)
    if not torch.cuda.is_available():
        raise SystemExit("bench.gpu: no CUDA device; run it on a GPU machine, or use --smoke here")
    cuda = torch.device("cuda")
    return Plan(False, cuda, torch.float16, 1024, 30, 8, (1, 2, 4, 8), "inductor", (torch.bfloat16,), worker_jobs=64)


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
    """Random `ip-adapter_sdxl` weights in the h94 layout (image_proj + to_k_ip/to_v_ip per attn2).

    Drawn from their own seeded generator: called again on the same UNet, it gives the same weights.
    """
    cross = int(unet.config.cross_attention_dim)
    gen = torch.Generator().manual_seed(ADAPTER_SEED)

    def draw(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

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
    _attach_adapter(pipe, m["image_encoder"], CLIPImageProcessor(size=size, crop_size=size), dtype=plan.dtype)
    pipe.to(plan.device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _attach_adapter(pipe: Any, encoder: Any, processor: Any, *, dtype: torch.dtype) -> None:
    """The image encoder and the random `ip-adapter_sdxl` weights into the pipeline, through diffusers."""
    pipe.register_modules(image_encoder=encoder, feature_extractor=processor)
    state = _adapter_state(pipe.unet, embed_dim=int(encoder.config.projection_dim), dtype=dtype)
    pipe.load_ip_adapter(state, subfolder="", weight_name="", image_encoder_folder=None)


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
    return parse_params({**raw, "width": plan.size_px, "height": plan.size_px, "guidance_scale": GUIDANCE_SCALE})


def baseline_call(pipe: Any, plan: Plan, index: int) -> Any:
    """One image the way a diffusers user writes it."""
    pipe.set_ip_adapter_scale(0.6)
    return pipe(
        prompt=f"a photo of a cat, variation {index}",
        ip_adapter_image=_reference(index % 2),
        width=plan.size_px,
        height=plan.size_px,
        num_inference_steps=plan.steps,
        guidance_scale=GUIDANCE_SCALE,
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


Config = tuple[str, int, bool, Callable[[int], Any]]  # name, batch, compiled, one call


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _ipab_name(batch: int, dtype: torch.dtype, *, compiled: bool) -> str:
    return f"ipab batch {batch} {_dtype_name(dtype)}" + (" compiled" if compiled else "")


def _configs(pipe: Any, renderer: Any, plan: Plan, *, compiled: bool, baseline: bool = False) -> list[Config]:
    """ipab at each batch, eager or compiled; stock diffusers first with `baseline`."""
    runs: list[Config] = []
    if baseline:
        name = f"diffusers baseline {_dtype_name(plan.dtype)}"
        runs.append((name, 1, False, lambda i: baseline_call(pipe, plan, i)))
    names = [(b, _ipab_name(b, plan.dtype, compiled=compiled)) for b in plan.batches]
    return runs + [(name, b, compiled, _ipab_call(renderer, plan, b)) for b, name in names]


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

    def measure(self, pipe: Any, configs: list[Config]) -> list[dict[str, Any]]:
        """Figures of each configuration of one pipeline (skipped once the budget is spent)."""
        results: list[dict[str, Any]] = []
        compiled = False
        for name, batch, compile_, call in configs:
            # A compile takes minutes on SDXL: start one only with that much budget left.
            reserve_s = COMPILE_RESERVE_S if compile_ and not compiled and not self.plan.smoke else 0.0
            if self.left_s() < reserve_s:
                results.append(self.skipped(name, batch, compile_))
                continue
            if compile_ and not compiled:
                pipe.unet.compile(fullgraph=False, backend=self.plan.compile_backend)  # as Renderer.load(compile=True)
                compiled = True
            results.append(self._timed(self._entry(name, batch, compile_), batch, call))
        return results

    def left_s(self) -> float:
        """Seconds of the budget left (negative once it is spent)."""
        return self.budget_s - (time.perf_counter() - self.t_start)

    def skipped(self, name: str, batch: int, compile_: bool) -> dict[str, Any]:
        """The entry of a configuration that the budget leaves out."""
        return {**self._entry(name, batch, compile_), "skipped": f"time budget of {self.budget_s:.0f} s spent"}

    def _entry(self, name: str, batch: int, compile_: bool) -> dict[str, Any]:
        return {"name": name, "batch": batch, "compile": compile_, "dtype": str(self.plan.dtype)}

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

    def worker_path(self, pipe: Any, results: list[dict[str, Any]]) -> dict[str, Any]:
        """The worker path at the largest batch, next to the in-process eager ipab at that batch (goal 1.0).

        Run only when the budget holds its estimate: start-up, then the jobs at the in-process
        s/image with a margin. Stopped past the budget by `WORKER_OVERRUN_S` at the latest.
        """
        plan, batch = self.plan, max(self.plan.batches)
        entry = {"jobs": plan.worker_jobs, "batch_size": batch, "device": plan.device.type}
        entry |= {"dtype": _dtype_name(plan.dtype), "pipeline": _ipab_name(batch, plan.dtype, compiled=False)}
        pipeline = next((r for r in results if r["name"] == entry["pipeline"] and "s_per_image" in r), None)
        if not plan.worker_jobs:
            return {**entry, "skipped": "no worker jobs in this plan"}
        if pipeline is None:
            return {**entry, "skipped": f"no in-process figure of {entry['pipeline']} to compare with"}
        needed_s = WORKER_START_S + plan.worker_jobs * pipeline["s_per_image"] * WORKER_MARGIN
        left_s = self.left_s()
        if needed_s > left_s:
            return {**entry, "skipped": f"needs about {needed_s:.0f} s, {left_s:.0f} s of the time budget left"}
        deadline = self.t_start + self.budget_s + WORKER_OVERRUN_S
        figures = _recorded_worker_path(pipe, plan, batch=batch, deadline=deadline)
        if "s_per_image" in figures:
            figures["worker_over_pipeline"] = figures["s_per_image"] / pipeline["s_per_image"]
        return {**entry, "pipeline_s_per_image": pipeline["s_per_image"], **figures}


# --- the fast set: a LoRA fused in by ipab's loader, TCD, 4 steps, no guidance ---------------------------


def random_lora(unet: Any, *, rank: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A random LoRA for the UNet's attention projections, in the diffusers/PEFT layout (`unet.<module>.lora_A`)."""
    gen = torch.Generator().manual_seed(ADAPTER_SEED + 1)
    state: dict[str, torch.Tensor] = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(LORA_TARGETS) and ".processor." not in name:
            down = torch.randn(rank, module.in_features, generator=gen) / module.in_features**0.5
            up = torch.randn(module.out_features, rank, generator=gen) * 0.02
            state[f"unet.{name}.lora_A.weight"] = down.to(dtype).contiguous()
            state[f"unet.{name}.lora_B.weight"] = up.to(dtype).contiguous()
    return state


def fast_renderer(pipe: Any, plan: Plan, folder: Path) -> tuple[Any, float]:
    """The fast set around `pipe`: its LoRA written out and fused in by `worker.loras`; (renderer, fuse seconds)."""
    from safetensors.torch import save_file

    from shared.model_set import LoraFile
    from shared.model_set_rules import parse_rules
    from worker.loras import fuse_loras

    lora = folder / "loras" / "bench-random-lora.safetensors"
    lora.parent.mkdir(parents=True, exist_ok=True)
    rank = SMOKE_LORA_RANK if plan.smoke else FAST_LORA_RANK
    save_file(random_lora(pipe.unet, rank=rank, dtype=plan.dtype), str(lora))
    renderer = make_renderer(pipe)
    rules = parse_rules({**FAST_DEFAULTS, **FAST_OPTIONS}, {"steps": [2, 8]})
    config = dataclasses.replace(renderer.config, name="bench-gpu-fast", loras=(LoraFile(lora),), rules=rules)
    _sync(plan)
    t0 = time.perf_counter()
    fuse_loras(pipe, config)
    _sync(plan)
    renderer.config, renderer.name = config, config.name
    return renderer, time.perf_counter() - t0


def _fast_call(renderer: Any, plan: Plan, batch: int) -> Callable[[int], Any]:
    from shared.spec import parse_params

    embeds = [renderer.encode([_reference(i)])[0] for i in range(2)]

    def call(i: int) -> Any:
        rows = [{"prompt": f"a photo of a cat, variation {i * batch + j}", "seed": i * batch + j} for j in range(batch)]
        size = {"width": plan.size_px, "height": plan.size_px}
        items = [(parse_params({**FAST_DEFAULTS, **row, **size}), [embeds[k % 2]]) for k, row in enumerate(rows)]
        return renderer.generate_batch(items)

    return call


def run_fast_set(sweep: _Sweep, pipe: Any, results: list[dict[str, Any]]) -> dict[str, Any]:
    """The fast set at the largest batch, eager, next to the default set's eager figure at that batch."""
    plan, batch = sweep.plan, max(sweep.plan.batches)
    default_name = _ipab_name(batch, plan.dtype, compiled=False)
    entry: dict[str, Any] = {"batch": batch, "lora_rank": SMOKE_LORA_RANK if plan.smoke else FAST_LORA_RANK}
    entry |= {**FAST_DEFAULTS, **FAST_OPTIONS, "default": default_name}
    default = next((r for r in results if r["name"] == default_name and "s_per_image" in r), None)
    if default is None:
        return {**entry, "skipped": f"no figure of {default_name} to compare with"}
    if sweep.left_s() < 0:
        return {**entry, "skipped": f"time budget of {sweep.budget_s:.0f} s spent"}
    try:
        with tempfile.TemporaryDirectory(prefix="ipab-bench-fast-") as scratch:
            renderer, entry["fuse_s"] = fast_renderer(pipe, plan, Path(scratch))
        entry.update(_time(plan, batch, _fast_call(renderer, plan, batch)))
    except Exception as e:  # the sweep's other figures must survive
        return {**entry, "error": f"{type(e).__name__}: {e}"[:1000]}
    entry["default_images_per_s"] = default["images_per_s"]
    entry["fast_over_default"] = entry["images_per_s"] / default["images_per_s"]
    return entry


# --- the worker path: the same weights through the whole system -------------------------------------

# Writing ~11 GB of fp16 weights (10-20 s), the worker's start and model load (~30 s), a warm-up job.
WORKER_START_S: Final = 75.0
WORKER_MARGIN: Final = 1.2  # on the in-process s/image, in the estimate that decides whether the part fits
WORKER_OVERRUN_S: Final = 45.0  # the part is stopped this far past the budget: 420 + 45 s stays under 8 min
WORKER_BATCH_WAIT_MS: Final = 200  # waited only while the queue holds less than a batch (at start-up)
WORKER_REFERENCES: Final = 2  # as many as the sweep's `_ipab_call` cycles over
WORKER_LOG: Final = "worker.log"
MODEL_SET_NAME: Final = "bench-gpu-random"
ADAPTER_FILE: Final = f"{ADAPTER_DIR}/ip-adapter_sdxl.safetensors"  # devkit.synth's (and h94's) layout
ENCODER_FOLDER: Final = ENCODER_FOLDERS["bigG"]


def save_model_set(pipe: Any, folder: Path, *, dtype: torch.dtype) -> Path:
    """The pipeline's weights in the public layouts the worker loads; returns the model-set.toml.

    As `devkit.synth` lays out its tiny set: `base/` (diffusers SDXL folder), the adapter's
    `.safetensors` (flat `image_proj.*`/`ip_adapter.*` keys) and the encoder's folder in h94's
    `IP-Adapter/sdxl_models/`. The adapter leaves the UNet for the save (a stock SDXL base has
    none) and goes back on after it, with the same weights: the sweep goes on with the pipeline.
    """
    from safetensors.torch import save_file

    encoder, processor = pipe.image_encoder, pipe.feature_extractor
    pipe.unload_ip_adapter()
    try:
        pipe.save_pretrained(folder / "base", safe_serialization=True)
    finally:
        _attach_adapter(pipe, encoder, processor, dtype=dtype)
    # One shard: the worker loads the encoder's `model.safetensors` and nothing else.
    encoder.save_pretrained(folder / ENCODER_FOLDER, max_shard_size="1000GB")
    state = _adapter_state(pipe.unet, embed_dim=int(encoder.config.projection_dim), dtype=dtype)
    flat = {f"{part}.{key}": t.contiguous() for part, tensors in state.items() for key, t in tensors.items()}
    (folder / ADAPTER_FILE).parent.mkdir(parents=True, exist_ok=True)
    save_file(flat, str(folder / ADAPTER_FILE))
    toml = folder / "model-set.toml"
    write_model_set(toml, name=MODEL_SET_NAME, base="base", ip_adapter=ADAPTER_FILE, image_encoder=ENCODER_FOLDER)
    return toml


def _recorded_worker_path(pipe: Any, plan: Plan, *, batch: int, deadline: float) -> dict[str, Any]:
    """`run_worker_path` in a scratch folder; a failure is recorded with the worker's log, not raised."""
    with tempfile.TemporaryDirectory(prefix="ipab-bench-gpu-") as scratch:
        try:
            return run_worker_path(pipe, plan, batch=batch, folder=Path(scratch), deadline=deadline)
        except Exception as e:  # the sweep's figures must survive a failing worker path
            return {"error": f"{type(e).__name__}: {e}"[:2000], "worker_log_tail": log_tail(Path(scratch) / WORKER_LOG)}


def run_worker_path(pipe: Any, plan: Plan, *, batch: int, folder: Path, deadline: float) -> dict[str, Any]:
    """`plan.worker_jobs` jobs end to end on the pipeline's weights: submit, SQL, dispatcher, one worker, S3.

    What `bench.overhead` runs, at full size: a private Redis and SeaweedFS, a SQLite database,
    one `ipab worker` process (its dispatcher feeds Redis from SQL), jobs of the sweep's size,
    steps and guidance. Waits until `deadline` (`time.perf_counter()`) at the latest.
    """
    # Services first: where they cannot start, no time goes into writing the weights.
    with private_services() as svc, private_database("sqlite", svc.workdir) as url:
        t0 = time.perf_counter()
        model_set = save_model_set(pipe, folder / "models", dtype=plan.dtype)
        write_s = time.perf_counter() - t0
        _free(plan)  # the GPU's memory for the worker; this process only waits
        settings = bench_settings(
            svc, url, model_set=model_set, device=plan.device.type, dtype=_dtype_name(plan.dtype),
            batch_size=batch, batch_wait_ms=WORKER_BATCH_WAIT_MS,
        )  # fmt: skip
        warm_up = _worker_manifest(svc.workdir, plan, "warm-up", rows=1)
        jobs = _worker_manifest(svc.workdir, plan, "jobs", rows=plan.worker_jobs)
        proc = start_worker(settings_env(settings), folder / WORKER_LOG)
        try:
            # The warm-up job is the readiness check too: it succeeds once the model is loaded,
            # and `wait_for_batch` notices a worker that died on the way.
            _submit_and_wait(settings, warm_up, proc, deadline=deadline)
            batch_id, wall_s = _submit_and_wait(settings, jobs, proc, deadline=deadline)
        finally:
            stop_workers([proc])
        return {"write_s": write_s, **_worker_figures(settings, batch_id, wall_s=wall_s)}


def _worker_manifest(workdir: Path, plan: Plan, name: str, *, rows: int) -> Path:
    """A manifest of `rows` jobs of the sweep's size, steps and guidance, named `name` (its batch's name)."""
    references = write_references(workdir / "refs", WORKER_REFERENCES)
    fields = {"width": plan.size_px, "height": plan.size_px, "steps": plan.steps, "guidance_scale": GUIDANCE_SCALE}
    return write_manifest(workdir / f"{name}.jsonl", references, rows=rows, fields=fields)


def _submit_and_wait(
    settings: Settings, manifest: Path, proc: subprocess.Popen[bytes], *, deadline: float
) -> tuple[str, float]:
    """Submit a manifest as its own batch; wait until every job is terminal. The batch id, seconds from submit."""
    from scheduler.submission.submit import submit_manifest

    t0 = time.perf_counter()
    result = submit_manifest(settings=settings, path=manifest, batch_name=manifest.stem, model_set_name=None)
    sessions = sessions_for(settings)
    wait_for_batch(sessions, result.batch_id, timeout_s=deadline - t0, procs=[proc], poll_s=0.1)
    return result.batch_id, time.perf_counter() - t0


def _worker_figures(settings: Settings, batch_id: str, *, wall_s: float) -> dict[str, Any]:
    """Checks that every job succeeded and its PNG is in S3; the steady-state rate and the batch sizes seen."""
    sessions = sessions_for(settings)
    counts = status_counts(sessions, batch_id)
    rows = job_rows(sessions, batch_id)
    if counts != {JobStatus.succeeded.value: len(rows)}:
        raise RuntimeError(f"not every job of the worker path succeeded: {counts}")
    stored = set(ObjectStore.from_settings(settings).list_keys())
    missing = [r.id for r in rows if not r.output_sha256 or r.output_key not in stored]
    if missing:
        raise RuntimeError(f"{len(missing)} of {len(rows)} succeeded jobs have no PNG in S3, e.g. job {missing[0]}")
    # A pipeline call's jobs finish together: the clock starts as the first call's last job finishes.
    first_call = rows[0].render_batch_size or 1
    s_per_image = steady_state_s_per_job([r.finished_at.timestamp() for r in rows[first_call - 1 :] if r.finished_at])
    sizes = Counter(str(r.render_batch_size) for r in rows)
    return {
        "succeeded": len(rows),
        "pngs_in_s3": len(rows),
        "wall_s": wall_s,  # submit to the last job's success
        "s_per_image": s_per_image,
        "images_per_s": 1 / s_per_image,
        "end_to_end_images_per_s": len(rows) / wall_s,
        "render_batch_sizes": dict(sorted(sizes.items(), key=lambda item: int(item[0]))),
    }


def run(plan: Plan, *, budget_s: float) -> dict[str, Any]:
    """Every configuration that fits the time budget; figures as a JSON-able dict.

    1. Stock diffusers (the anchor) and ipab eager, in the plan's dtype.
    2. The worker path on that pipeline (it is compared with step 1's figures).
    3. The fast set: a LoRA fused into that pipeline, TCD, 4 steps, no guidance (against step 1's).
    4. ipab compiled, same pipeline (the LoRA fused in costs nothing per step).
    5. ipab again, eager and compiled, in each of `plan.other_dtypes` (a pipeline rebuilt in it).
    """
    t_start = time.perf_counter()
    pipe = build_pipeline(plan)
    renderer = make_renderer(pipe)
    build_s = time.perf_counter() - t_start
    flops = count_flops(functools.partial(baseline_call, pipe, plan, 0))
    sweep = _Sweep(plan=plan, t_start=t_start, budget_s=budget_s, flops=flops, peak=_peak_tflops(plan))
    results = sweep.measure(pipe, _configs(pipe, renderer, plan, compiled=False, baseline=True))
    worker = sweep.worker_path(pipe, results)
    fast = run_fast_set(sweep, pipe, results)
    results += sweep.measure(pipe, _configs(pipe, renderer, plan, compiled=True))
    del pipe, renderer
    for dtype in plan.other_dtypes:
        results += _measure_rebuilt(sweep, dataclasses.replace(plan, dtype=dtype))
    base = results[0].get("s_per_image")
    for entry in results:
        if base and "s_per_image" in entry:
            entry["speedup_vs_baseline"] = base / entry["s_per_image"]
    return {
        "smoke": plan.smoke,
        "device": torch.cuda.get_device_name() if plan.device.type == "cuda" else platform.processor() or "cpu",
        "dtype": _dtype_name(plan.dtype),
        "other_dtypes": [_dtype_name(d) for d in plan.other_dtypes],
        "size_px": plan.size_px,
        "steps": plan.steps,
        "guidance_scale": GUIDANCE_SCALE,
        "tflop_per_image": flops / 1e12,
        "peak_tflops_assumed": sweep.peak,
        "build_s": build_s,
        "total_s": time.perf_counter() - t_start,
        "versions": _versions(),
        "configs": results,
        "worker_path": worker,
        "fast_set": fast,
    }


def _measure_rebuilt(sweep: _Sweep, plan: Plan) -> list[dict[str, Any]]:
    """ipab eager and compiled on a pipeline rebuilt in `plan.dtype` (the previous one freed first)."""
    sweep.plan = plan
    if sweep.left_s() < 0:  # a full-size pipeline takes a while to build: not for configurations all skipped
        configs = [(b, c, _ipab_name(b, plan.dtype, compiled=c)) for c in (False, True) for b in plan.batches]
        return [sweep.skipped(name, b, c) for b, c, name in configs]
    _free(plan)
    pipe = build_pipeline(plan)
    renderer = make_renderer(pipe)
    return sweep.measure(
        pipe, _configs(pipe, renderer, plan, compiled=False) + _configs(pipe, renderer, plan, compiled=True)
    )


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
