"""Load the parts of a model set: base SDXL pipeline, image encoder, adapter checks, device and dtype.

Every failure becomes a `ModelSetError` (or `IncompatibleEncoder`) that names the model-set key
and file and says what to do, instead of a shape error from deep inside torch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any, Final

import torch
from torch import nn

from shared.errors import IncompatibleEncoder, ModelSetError
from shared.model_set import ModelSetConfig
from worker.weights import AdapterInfo

DTYPES: Final = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# Widths of the public image encoders, to name the one an adapter needs.
KNOWN_ENCODERS: Final = {
    ("projection_dim", 1280): "ViT-bigG-14 (h94/IP-Adapter sdxl_models/image_encoder)",
    ("hidden_size", 1664): "ViT-bigG-14 (h94/IP-Adapter sdxl_models/image_encoder)",
    ("projection_dim", 1024): "ViT-H-14 (h94/IP-Adapter models/image_encoder)",
    ("hidden_size", 1280): "ViT-H-14 (h94/IP-Adapter models/image_encoder)",
}
HASH_CHUNK_BYTES: Final = 16 * 1024 * 1024


def resolve_device(device: str) -> torch.device:
    """`auto` -> the first CUDA device if there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError:
        raise ModelSetError(f"device {device!r} is not a torch device; use auto, cpu, cuda or cuda:N") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ModelSetError(f"device {device!r} asked for, but CUDA is not available here; use cpu or auto")
    return resolved


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """`auto` -> fp16 on CUDA, fp32 on CPU (CPU half precision is slow and poorly supported)."""
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ModelSetError(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


def load_image_encoder(config: ModelSetConfig, *, dtype: torch.dtype) -> tuple[Any, Any]:
    """The CLIP image encoder (safetensors only) and the preprocessing diffusers would pair with it."""
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    folder = config.image_encoder
    if not (folder / "model.safetensors").is_file():
        raise ModelSetError(f"{config.source}: `image_encoder`: {folder} has no model.safetensors (pickles refused)")
    try:
        encoder: Any = CLIPVisionModelWithProjection.from_pretrained(folder, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, KeyError) as e:
        raise ModelSetError(f"{config.source}: `image_encoder`: {folder} is not a CLIP image encoder: {e}") from None
    encoder.eval()
    size = int(encoder.config.image_size)
    # What diffusers' load_ip_adapter builds when the pipeline has no feature extractor.
    processor = CLIPImageProcessor(size=size, crop_size=size)
    return encoder, processor


def check_pairing(info: AdapterInfo, encoder: Any, *, config: ModelSetConfig) -> None:
    """Raise `IncompatibleEncoder` naming the encoder the adapter needs when the widths do not match."""
    field = info.encoder_width_name
    have = int(getattr(encoder.config, field))
    if have == info.embed_dim:
        return
    need_name = KNOWN_ENCODERS.get((field, info.embed_dim), f"an image encoder with {field} {info.embed_dim}")
    have_name = KNOWN_ENCODERS.get((field, have), f"{field} {have}")
    raise IncompatibleEncoder(
        f"{config.source}: `ip_adapter` {config.ip_adapter.name} ({info.kind}, {info.tokens} tokens) needs "
        f"{need_name}, but `image_encoder` {config.image_encoder} is {have_name}; point `image_encoder` "
        "at the encoder this adapter was trained with"
    )


def check_base(info: AdapterInfo, unet: Any, *, config: ModelSetConfig) -> None:
    """Refuse an adapter made for another base (SD 1.5 adapters on SDXL, ...) before diffusers fails inside."""
    width = int(unet.config.cross_attention_dim)
    layers = sum(1 for name in unet.attn_processors if name.endswith("attn2.processor"))
    if (info.cross_attention_dim, info.layers) != (width, layers):
        raise ModelSetError(
            f"{config.source}: `ip_adapter` {config.ip_adapter.name} is for a UNet with cross_attention_dim "
            f"{info.cross_attention_dim} and {info.layers} cross-attention layers, but `base` has {width} and "
            f"{layers}; use an SDXL adapter (h94/IP-Adapter sdxl_models) with an SDXL base"
        )


def load_base(config: ModelSetConfig, *, dtype: torch.dtype) -> Any:
    """The base `StableDiffusionXLPipeline` from a diffusers folder, a hub id or a single-file checkpoint."""
    from diffusers import StableDiffusionXLPipeline
    from huggingface_hub import constants

    try:
        if config.base_kind == "single_file":
            return StableDiffusionXLPipeline.from_single_file(
                config.base, config=str(config.base_config), local_files_only=True, dtype=dtype
            )
        load: Any = StableDiffusionXLPipeline.from_pretrained
        return load(config.base, dtype=dtype, use_safetensors=True)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        hint = ""
        if config.base_kind == "hub" and constants.HF_HUB_OFFLINE:
            hint = " HF_HUB_OFFLINE is set and the model is not in the local cache; run `ipab models download`."
        raise ModelSetError(f"{config.source}: `base` {config.base} cannot be loaded: {e}.{hint}") from None


def encoder_identity(config: ModelSetConfig, *, dtype: torch.dtype, processor: Any, image_size: int) -> str:
    """A stable id for "these pixels -> these embeddings": weights, config, dtype and preprocessing."""
    digest = hashlib.sha256()
    folder = config.image_encoder
    for name in ("config.json", "model.safetensors"):
        digest.update(name.encode() + b"\0")
        with (folder / name).open("rb") as f:
            while chunk := f.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
    settings = {"dtype": str(dtype), "processor": type(processor).__name__, "size": image_size}
    digest.update(json.dumps(settings, sort_keys=True).encode())
    return digest.hexdigest()[:32]


def materialize(module: nn.Module) -> None:
    """Copy parameters out of the memory-mapped weight files into fresh, aligned CPU memory.

    CPU matmul kernels round differently depending on the alignment of their operands, and a
    mapped file places each tensor wherever the file layout puts it: without this, the same
    weights from a single-file checkpoint and from a diffusers folder give images that differ
    in the 6th decimal.
    """
    with torch.no_grad():
        for param in module.parameters():
            param.data = param.data.clone()
        for name, buffer in list(module.named_buffers()):
            owner, _, leaf = name.rpartition(".")
            target = module.get_submodule(owner) if owner else module
            target._buffers[leaf] = buffer.clone()
