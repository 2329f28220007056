"""`ipab models download DIR`: fetch the public SDXL IP-Adapter weights and write their model sets.

For users with a network (honours `HF_TOKEN`, `HF_HUB_OFFLINE`, `HF_ENDPOINT` through
huggingface_hub). It fetches only safetensors files (never pickles):

    DIR/stable-diffusion-xl-base-1.0/   SDXL base, fp16 weights (saved under the plain file names,
                                        so they load without a `variant`; a CPU run upcasts them)
    DIR/IP-Adapter/sdxl_models/<variant>.safetensors, DIR/IP-Adapter/sdxl_models/image_encoder/,
    DIR/IP-Adapter/models/image_encoder/  (as in the h94/IP-Adapter repository)
    DIR/model-set-<variant>.toml        one per adapter variant

About 7 GB for the base and 4 GB for the two image encoders.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Final

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
