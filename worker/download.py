"""`ipab models download DIR`: fetch the public SDXL IP-Adapter weights and write their model sets.

For users with a network (honours `HF_TOKEN`, `HF_HUB_OFFLINE`, `HF_ENDPOINT` through
huggingface_hub). It fetches only safetensors files (never pickles):

    DIR/stable-diffusion-xl-base-1.0/   SDXL base, fp16 weights (saved under the plain file names,
                                        so they load without a `variant`; a CPU run upcasts them)
    DIR/IP-Adapter/sdxl_models/<variant>.safetensors, DIR/IP-Adapter/sdxl_models/image_encoder/,
    DIR/IP-Adapter/models/image_encoder/  (as in the h94/IP-Adapter repository)
    DIR/model-set-<variant>.toml        one per adapter variant

About 7 GB for the base and 4 GB for the two image encoders.

`ipab models download --preset tcd|lcm|lightning-4step|lightning-8step DIR` fetches the same base,
one adapter variant (default `ip-adapter_sdxl`) and its encoder, and a step-distilled LoRA into
DIR/loras/, and writes DIR/model-set-<preset>.toml: the LoRA, the scheduler and settings its
authors give (4 or 8 steps, no classifier-free guidance) as `[defaults]`, and `[limits]` that refuse
jobs it was not distilled for. These sets trade some fidelity and diversity for 5-7x throughput
(README: Fast model sets).
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from shared.errors import InvalidInput, ModelSetError
from shared.model_set import write_model_set

log = logging.getLogger(__name__)

ADAPTER_REPO: Final = "h94/IP-Adapter"
BASE_REPO: Final = "stabilityai/stable-diffusion-xl-base-1.0"
BASE_DIR: Final = "stable-diffusion-xl-base-1.0"
ADAPTER_DIR: Final = "IP-Adapter"
# variant -> the image encoder folder (in the h94 repository) it was trained with
VARIANT_ENCODERS: Final = {
    "ip-adapter_sdxl": "sdxl_models/image_encoder",
    "ip-adapter_sdxl_vit-h": "models/image_encoder",
    "ip-adapter-plus_sdxl_vit-h": "models/image_encoder",
    "ip-adapter-plus-face_sdxl_vit-h": "models/image_encoder",
}
BASE_CONFIG_FILES: Final = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "text_encoder/config.json",
    "text_encoder_2/config.json",
    "unet/config.json",
    "vae/config.json",
    *(f"{t}/{f}" for t in ("tokenizer", "tokenizer_2") for f in ("merges.txt", "special_tokens_map.json")),
    *(f"{t}/{f}" for t in ("tokenizer", "tokenizer_2") for f in ("tokenizer_config.json", "vocab.json")),
)
# hub file (fp16 variant) -> local name (loads without `variant="fp16"`)
BASE_WEIGHT_FILES: Final = {
    "text_encoder/model.fp16.safetensors": "text_encoder/model.safetensors",
    "text_encoder_2/model.fp16.safetensors": "text_encoder_2/model.safetensors",
    "unet/diffusion_pytorch_model.fp16.safetensors": "unet/diffusion_pytorch_model.safetensors",
    "vae/diffusion_pytorch_model.fp16.safetensors": "vae/diffusion_pytorch_model.safetensors",
}


LORA_DIR: Final = "loras"
DEFAULT_PRESET_VARIANT: Final = "ip-adapter_sdxl"  # the adapter diffusers' TCD + IP-Adapter example uses


@dataclass(frozen=True)
class Preset:
    """A step-distilled model set: the LoRA's hub file, and the settings its authors give, as the set's rules."""

    repo: str
    filename: str
    local_name: str
    defaults: dict[str, Any]
    limits: dict[str, Any] = field(default_factory=dict)


# As their model cards and diffusers' docs run them: TCD (h1t/TCD-SDXL-LoRA: TCDScheduler, 4 steps,
# guidance 0, eta 0.3), LCM-LoRA (latent-consistency/lcm-lora-sdxl: LCMScheduler, 4 steps, guidance
# 1, i.e. none), SDXL-Lightning (ByteDance/SDXL-Lightning: Euler with trailing timesteps, guidance 0,
# exactly the steps it was distilled for). Each set's limits hold it to the scheduler it was
# distilled for: another sampler at these step counts gives a degraded image.
PRESETS: Final = {
    "tcd": Preset(
        "h1t/TCD-SDXL-LoRA",
        "pytorch_lora_weights.safetensors",
        "tcd-sdxl-lora.safetensors",
        {"scheduler": "tcd", "steps": 4, "guidance_scale": 0.0, "eta": 0.3},
        {"steps": [2, 8], "guidance_scale": [0.0, 2.0], "scheduler": ["tcd"]},
    ),
    "lcm": Preset(
        "latent-consistency/lcm-lora-sdxl",
        "pytorch_lora_weights.safetensors",
        "lcm-lora-sdxl.safetensors",
        {"scheduler": "lcm", "steps": 4, "guidance_scale": 1.0},
        {"steps": [2, 8], "guidance_scale": [0.0, 2.0], "scheduler": ["lcm"]},
    ),
    "lightning-4step": Preset(
        "ByteDance/SDXL-Lightning",
        "sdxl_lightning_4step_lora.safetensors",
        "sdxl_lightning_4step_lora.safetensors",
        {"scheduler": "euler_trailing", "steps": 4, "guidance_scale": 0.0},
        {"steps": [4, 4], "guidance_scale": [0.0, 1.0], "scheduler": ["euler_trailing"]},
    ),
    "lightning-8step": Preset(
        "ByteDance/SDXL-Lightning",
        "sdxl_lightning_8step_lora.safetensors",
        "sdxl_lightning_8step_lora.safetensors",
        {"scheduler": "euler_trailing", "steps": 8, "guidance_scale": 0.0},
        {"steps": [8, 8], "guidance_scale": [0.0, 1.0], "scheduler": ["euler_trailing"]},
    ),
}


def download_preset(dir: Path, preset: str, *, variant: str = DEFAULT_PRESET_VARIANT, base: bool = True) -> Path:
    """Fetch the base, `variant`'s adapter and encoder and the preset's LoRA; write and return its model set."""
    if preset not in PRESETS:
        raise InvalidInput("--preset", preset, f"must be one of {', '.join(PRESETS)}")
    chosen = PRESETS[preset]
    # 1. Base, adapter and encoder, as for a plain set (that set's toml is written too).
    download_model_sets(dir, variants=(variant,), base=base)
    # 2. The LoRA (safetensors: the model set refuses pickles).
    _fetch(chosen.repo, chosen.filename, dir / LORA_DIR, local_name=chosen.local_name)
    # 3. The fast set: the LoRA fused at scale 1, the authors' settings as defaults and limits.
    path = dir / f"model-set-{preset}.toml"
    write_model_set(
        path,
        name=f"{variant.lower()}-{preset}",
        base=BASE_DIR,
        ip_adapter=f"{ADAPTER_DIR}/sdxl_models/{variant}.safetensors",
        image_encoder=f"{ADAPTER_DIR}/{VARIANT_ENCODERS[variant]}",
        loras=[(f"{LORA_DIR}/{chosen.local_name}", 1.0)],
        defaults=chosen.defaults,
        limits=chosen.limits,
    )
    return path


def download_model_sets(
    dir: Path, *, variants: Sequence[str] = tuple(VARIANT_ENCODERS), base: bool = True
) -> dict[str, Path]:
    """Fetch the base (unless `base=False`), the adapters and their encoders; return toml paths by variant."""
    unknown = [v for v in variants if v not in VARIANT_ENCODERS]
    if unknown:
        raise InvalidInput("variant", unknown[0], f"must be one of {', '.join(VARIANT_ENCODERS)}")
    # 1. Base model.
    if base:
        for name in BASE_CONFIG_FILES:
            _fetch(BASE_REPO, name, dir / BASE_DIR)
        for remote, local in BASE_WEIGHT_FILES.items():
            _fetch(BASE_REPO, remote, dir / BASE_DIR, local_name=local)
    # 2. Adapters and the image encoders they need.
    for encoder in sorted({VARIANT_ENCODERS[v] for v in variants}):
        for name in ("config.json", "model.safetensors"):
            _fetch(ADAPTER_REPO, f"{encoder}/{name}", dir / ADAPTER_DIR)
    for variant in variants:
        _fetch(ADAPTER_REPO, f"sdxl_models/{variant}.safetensors", dir / ADAPTER_DIR)
    # 3. One model set per variant.
    paths = {}
    for variant in variants:
        path = dir / f"model-set-{variant}.toml"
        write_model_set(
            path,
            name=variant.lower(),
            base=BASE_DIR,
            ip_adapter=f"{ADAPTER_DIR}/sdxl_models/{variant}.safetensors",
            image_encoder=f"{ADAPTER_DIR}/{VARIANT_ENCODERS[variant]}",
        )
        paths[variant] = path
    return paths


def _fetch(repo_id: str, filename: str, local_dir: Path, *, local_name: str | None = None) -> Path:
    """One file from the hub into `local_dir` (skipped when already there)."""
    import huggingface_hub

    target = local_dir / (local_name or filename)
    if target.is_file():
        return target
    log.info("fetching %s/%s", repo_id, filename)
    try:
        fetched = Path(huggingface_hub.hf_hub_download(repo_id=repo_id, filename=filename, local_dir=local_dir))
    except Exception as e:  # network, auth, missing file: all end the download the same way
        raise ModelSetError(
            f"cannot download {repo_id}/{filename}: {e}; check the network, HF_TOKEN or HF_ENDPOINT"
        ) from e
    if fetched != target:
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(fetched, target)
    return target
