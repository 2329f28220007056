"""Tiny random-weight SDXL + IP-Adapter model sets in the public file layouts, for tests and demos.

The weights are random: the images they make are noise. What is real is everything else:
the diffusers folder layout, the SDXL block structure (so InstantStyle block names exist),
the h94/IP-Adapter key names and shapes (scaled down), the `.bin`/`.safetensors` formats,
the single-file checkpoint in the original SDXL key layout, and the model-set tomls.
Nothing is downloaded: the CLIP tokenizer is a byte-level vocabulary written here.

Layout written under DIR (it mirrors the hub repositories):

    base/                               diffusers SDXL folder
    base.safetensors + base_config/     the same weights as one original-layout checkpoint
    IP-Adapter/sdxl_models/*.{bin,safetensors}, IP-Adapter/sdxl_models/image_encoder/ (bigG-like)
    IP-Adapter/models/image_encoder/    (ViT-H-like)
    loras/tiny-tcd-lora.safetensors     a LoRA for the tiny UNet and text encoder, diffusers/PEFT layout
    loras/tiny-kohya-lora.safetensors   a UNet LoRA in kohya's layout (`lora_unet_input_blocks_4_1_...`)
    model-set-*.toml                    one per (variant, format, base kind); model-set.toml is the default;
                                        model-set-fast.toml: the LoRA, TCD, 4 steps, guidance 0 (a
                                        step-distilled set's shape; the LoRA is random, not distilled)
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import torch
from safetensors.torch import save_file
from torch import nn

from shared.model_set import write_model_set

Tensors = dict[str, torch.Tensor]

# Hidden widths of text_encoder (CLIP-L stand-in) and text_encoder_2 (bigG stand-in). They must
# differ: diffusers' single-file loader tells the two encoders apart by width.
TEXT_DIMS: Final = (32, 48)
CROSS_ATTENTION_DIM: Final = sum(TEXT_DIMS)  # SDXL concatenates both encoders' hidden states
TIME_EMBED_DIM: Final = 8
# Stand-ins for ViT-bigG-14 (hidden 1664, projection 1280) and ViT-H-14 (hidden 1280, projection
# 1024): every width differs, so any wrong adapter/encoder pairing is detectable.
ENCODER_WIDTHS: Final = {"bigG": (64, 40), "vit-h": (48, 32)}  # (hidden_size, projection_dim)
ENCODER_FOLDERS: Final = {"bigG": "IP-Adapter/sdxl_models/image_encoder", "vit-h": "IP-Adapter/models/image_encoder"}
# variant -> (encoder, kind); plus adapters use a Resampler with 16 query tokens.
VARIANTS: Final = {
    "ip-adapter_sdxl": ("bigG", "plain"),
    "ip-adapter_sdxl_vit-h": ("vit-h", "plain"),
    "ip-adapter-plus_sdxl_vit-h": ("vit-h", "plus"),
    "ip-adapter-plus-face_sdxl_vit-h": ("vit-h", "plus"),
}
FORMATS: Final = ("safetensors", "bin")
PLAIN_TOKENS: Final = 4
PLUS_TOKENS: Final = 16
RESAMPLER_DIM: Final = 64  # one head of 64 (diffusers infers heads as width // 64)
RESAMPLER_DEPTH: Final = 4
RESAMPLER_FF_MULT: Final = 4
ADAPTER_DIR: Final = "IP-Adapter/sdxl_models"
DEFAULT_KEY: Final = "ip-adapter_sdxl.safetensors"
LORA_DIR: Final = "loras"
LORA_RANK: Final = 4
LORA_FILES: Final = {"diffusers": "tiny-tcd-lora.safetensors", "kohya": "tiny-kohya-lora.safetensors"}
# The layers LoRAs train in SDXL attention (UNet) and CLIP (text encoder), as diffusers' trainers pick them.
UNET_LORA_TARGETS: Final = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_LORA_TARGETS: Final = ("q_proj", "k_proj", "v_proj", "out_proj")
LORA_B_SCALE: Final = 0.2  # the LoRA moves each weight by about a fifth of its size: visible, not wild
# The fast set: what a TCD-LoRA set looks like (`ipab models download --preset tcd` writes the real one).
FAST_SET: Final[dict[str, Any]] = {
    "defaults": {"scheduler": "tcd", "steps": 4, "guidance_scale": 0.0, "eta": 0.3},
    "limits": {"steps": [2, 8], "guidance_scale": [0.0, 2.0]},
}

README: Final = """# Tiny random-weight model set (python -m devkit synth)

These weights are RANDOM. Every image they produce is noise. They exist so that tests and
demos exercise the real loading and generation code offline: the file layouts, key names
and tensor shapes follow the public SDXL and h94/IP-Adapter releases, scaled down.
"""


def write_tiny_model_set(dir: Path, *, seed: int = 0) -> dict[str, Path]:
    """Write a tiny model set under `dir`; return model-set toml paths by "<variant>.<format>[.single_file]".

    The key "default" is the plain bigG adapter in safetensors with the diffusers base.
    Same seed -> the same bytes in every file.
    """
    dir.mkdir(parents=True, exist_ok=True)
    (dir / "README.md").write_text(README)
    # 1. Base model: diffusers folder, then the same weights as one original-layout file.
    pipe = _tiny_pipeline(seed)
    pipe.save_pretrained(dir / "base", safe_serialization=True)
    _write_tokenizer(dir / "base" / "tokenizer", pad_token="<|endoftext|>")
    _write_tokenizer(dir / "base" / "tokenizer_2", pad_token="!")
    _write_single_file(pipe, dir)
    # 2. Image encoders and adapters, in the h94 layout.
    for index, (name, folder) in enumerate(ENCODER_FOLDERS.items()):
        _write_image_encoder(dir / folder, name, seed=seed + 100 + index)
    unet = pipe.unet
    for index, (variant, (encoder, kind)) in enumerate(VARIANTS.items()):
        state = _adapter_state(unet, encoder=encoder, kind=kind, seed=seed + 200 + index)
        _write_adapter(state, dir / ADAPTER_DIR / variant)
    # 3. LoRAs for the tiny UNet (and text encoder), in both layouts diffusers reads.
    write_tiny_loras(pipe, dir / LORA_DIR, seed=seed + 300)
    # 4. One model-set toml per combination, and the fast set.
    return _write_tomls(dir)


def _write_tomls(dir: Path) -> dict[str, Path]:
    paths: dict[str, Path] = {}
    for variant, (encoder, _kind) in VARIANTS.items():
        for fmt in FORMATS:
            for single in (False, True):
                key = f"{variant}.{fmt}" + (".single_file" if single else "")
                name = f"tiny-{variant}-{fmt}" + ("-single" if single else "")
                path = dir / f"model-set-{name.removeprefix('tiny-')}.toml"
                write_model_set(
                    path,
                    name=name,
                    base="base.safetensors" if single else "base",
                    base_config="base_config" if single else None,
                    ip_adapter=f"{ADAPTER_DIR}/{variant}.{fmt}",
                    image_encoder=ENCODER_FOLDERS[encoder],
                )
                paths[key] = path
    default = dir / "model-set.toml"
    shutil.copyfile(paths[DEFAULT_KEY], default)
    paths["default"] = default
    for key, lora in (("fast", "diffusers"), ("fast.kohya", "kohya")):
        path = dir / f"model-set-{key.replace('.', '-')}.toml"
        write_model_set(
            path,
            name=f"tiny-{key.replace('.', '-')}",
            base="base",
            ip_adapter=f"{ADAPTER_DIR}/{DEFAULT_KEY}",
            image_encoder=ENCODER_FOLDERS["bigG"],
            loras=[(f"{LORA_DIR}/{LORA_FILES[lora]}", 1.0)],
            **FAST_SET,
        )
        paths[key] = path
    return paths


def write_tiny_loras(pipe: Any, folder: Path, *, seed: int) -> dict[str, Path]:
    """Two random LoRAs for `pipe`: the same UNet weights in diffusers/PEFT layout (with text-encoder
    layers too) and in kohya's (UNet only), so both layouts must fuse into the same UNet.

    diffusers/PEFT: `unet.<module>.lora_A.weight` (rank x in) and `.lora_B.weight` (out x rank), and
    `text_encoder.text_model.<module>...`, as diffusers' `save_lora_weights` writes them. kohya:
    `lora_unet_<original SDXL module path, dots as underscores>.lora_down.weight` / `.lora_up.weight`
    / `.alpha`, as kohya's sd-scripts write SDXL LoRAs.
    """
    folder.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    unet = _lora_pairs(_linear_layers(pipe.unet, UNET_LORA_TARGETS), gen)
    text = _lora_pairs(_linear_layers(pipe.text_encoder, TEXT_LORA_TARGETS), gen)
    peft: Tensors = {}
    for prefix, pairs in (("unet.", unet), ("text_encoder.text_model.", text)):
        for module, (down, up) in pairs.items():
            peft[f"{prefix}{module}.lora_A.weight"], peft[f"{prefix}{module}.lora_B.weight"] = down, up
    kohya: Tensors = {}
    unet_state = pipe.unet.state_dict()
    layers_per_block = int(pipe.unet.config.layers_per_block)
    for module, (down, up) in unet.items():
        original = _unet_key(f"{module}.weight", layers_per_block, unet_state).removesuffix(".weight")
        stem = "lora_unet_" + original.replace(".", "_")
        kohya |= {f"{stem}.lora_down.weight": down, f"{stem}.lora_up.weight": up}
        kohya[f"{stem}.alpha"] = torch.tensor(float(LORA_RANK))  # alpha = rank: scale 1, as PEFT's default
    paths = {kind: folder / name for kind, name in LORA_FILES.items()}
    save_file(peft, str(paths["diffusers"]))
    save_file(kohya, str(paths["kohya"]))
    return paths


def _linear_layers(model: nn.Module, targets: tuple[str, ...]) -> dict[str, tuple[int, int]]:
    """`module name -> (in, out)` of the linear layers a LoRA would train (attention projections)."""
    return {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.endswith(tuple(f".{t}" for t in targets))
    }


def _lora_pairs(
    layers: dict[str, tuple[int, int]], gen: torch.Generator
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    pairs = {}
    for name, (fan_in, fan_out) in sorted(layers.items()):
        down = torch.randn(LORA_RANK, fan_in, generator=gen) / fan_in**0.5
        up = torch.randn(fan_out, LORA_RANK, generator=gen) * LORA_B_SCALE / LORA_RANK**0.5
        pairs[name] = (down.contiguous(), up.contiguous())
    return pairs


@contextmanager
def _seeded(seed: int) -> Iterator[torch.Generator]:
    """A generator for our own init, with the global RNG restored afterwards (construction draws from it)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield torch.Generator().manual_seed(seed)


def _randomize(model: nn.Module, gen: torch.Generator) -> None:
    """Re-draw every parameter with fan-in scaling, so activations stay O(1) and inputs matter.

    (transformers' default init uses std 0.02, which makes a tiny CLIP nearly blind to its input.)
    """
    with torch.no_grad():
        for module in model.modules():
            is_norm = isinstance(module, (nn.LayerNorm, nn.GroupNorm))
            for name, param in module.named_parameters(recurse=False):
                noise = torch.randn(param.shape, generator=gen)
                if is_norm:
                    param.copy_(1.0 + 0.1 * noise if name == "weight" else 0.1 * noise)
                elif param.ndim >= 2:
                    param.copy_(noise / param[0].numel() ** 0.5)
                else:
                    param.copy_(0.1 * noise)


def _tiny_pipeline(seed: int) -> Any:
    from diffusers import StableDiffusionXLPipeline

    with _seeded(seed) as gen:
        unet, vae = _tiny_unet(), _tiny_vae()
        text_encoder, text_encoder_2 = _tiny_text_encoders()
        for model in (unet, vae, text_encoder, text_encoder_2):
            _randomize(model, gen)
    tokenizer = _tokenizer_object("<|endoftext|>")
    pipeline_class: Any = StableDiffusionXLPipeline  # diffusers is untyped
    return pipeline_class(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=_tokenizer_object("!"),
        unet=unet,
        scheduler=_scheduler(),
        force_zeros_for_empty_prompt=True,
    )


def _tiny_unet() -> Any:
    from diffusers import UNet2DConditionModel

    # The SDXL block layout with tiny widths: InstantStyle's block names exist as in SDXL.
    unet_class: Any = UNet2DConditionModel
    return unet_class(
        sample_size=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(32, 64, 64),
        layers_per_block=2,
        transformer_layers_per_block=(1, 1, 1),
        attention_head_dim=(2, 4, 4),
        cross_attention_dim=CROSS_ATTENTION_DIM,
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=TIME_EMBED_DIM,
        projection_class_embeddings_input_dim=6 * TIME_EMBED_DIM + TEXT_DIMS[1],
    )


def _tiny_vae() -> Any:
    from diffusers import AutoencoderKL

    vae_class: Any = AutoencoderKL
    return vae_class(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(32, 32, 64, 64),
        layers_per_block=2,
        latent_channels=4,
        sample_size=64,
        scaling_factor=0.13025,
        force_upcast=True,
    )


def _tiny_text_encoders() -> tuple[Any, Any]:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    common: dict[str, Any] = {"vocab_size": 514, "max_position_embeddings": 77, "intermediate_size": 64}
    common |= {"num_attention_heads": 2, "num_hidden_layers": 3, "bos_token_id": 512, "eos_token_id": 513}
    one = CLIPTextConfig(hidden_size=TEXT_DIMS[0], hidden_act="quick_gelu", **common)
    two = CLIPTextConfig(hidden_size=TEXT_DIMS[1], hidden_act="gelu", projection_dim=TEXT_DIMS[1], **common)
    return CLIPTextModel(one), CLIPTextModelWithProjection(two)


def _scheduler() -> Any:
    from diffusers import EulerDiscreteScheduler

    # SDXL base's scheduler config.
    scheduler_class: Any = EulerDiscreteScheduler
    return scheduler_class(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        prediction_type="epsilon",
        steps_offset=1,
        timestep_spacing="leading",
        interpolation_type="linear",
        use_karras_sigmas=False,
    )


def _byte_symbols() -> list[str]:
    """CLIP's byte-to-unicode table: 256 printable symbols, one per byte value."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    codes = {b: b for b in printable}
    extra = 0
    for b in range(256):
        if b not in codes:
            codes[b] = 256 + extra
            extra += 1
    return [chr(codes[b]) for b in range(256)]


def _vocab() -> dict[str, int]:
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    return vocab


def _write_tokenizer(folder: Path, *, pad_token: str) -> None:
    """A byte-level CLIP tokenizer with no merges: every character is a token. Written, never downloaded."""
    if folder.exists():
        shutil.rmtree(folder)  # replace whatever save_pretrained wrote, so the bytes are ours
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(_vocab(), ensure_ascii=False, sort_keys=True))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    config = {"tokenizer_class": "CLIPTokenizer", "model_max_length": 77, "pad_token": pad_token}
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
    (folder / "special_tokens_map.json").write_text(json.dumps({**special, "pad_token": pad_token}, indent=2))


def _tokenizer_object(pad_token: str) -> Any:
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=_vocab(), merges=[], pad_token=pad_token, model_max_length=77)


def _write_image_encoder(folder: Path, name: str, *, seed: int) -> None:
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    hidden, projection = ENCODER_WIDTHS[name]
    config = CLIPVisionConfig(
        hidden_size=hidden,
        projection_dim=projection,
        intermediate_size=2 * hidden,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=32,
        patch_size=8,
        hidden_act="gelu",
    )
    with _seeded(seed) as gen:
        model = CLIPVisionModelWithProjection(config)
        _randomize(model, gen)
    model.save_pretrained(folder, safe_serialization=True)


def _adapter_state(unet: Any, *, encoder: str, kind: str, seed: int) -> dict[str, Tensors]:
    """Adapter weights in the h94 layout: image_proj (ImageProjModel or Resampler) + ip_adapter (to_k_ip/to_v_ip)."""
    gen = torch.Generator().manual_seed(seed)
    hidden, projection = ENCODER_WIDTHS[encoder]
    shapes = _plain_proj_shapes(projection) if kind == "plain" else _resampler_shapes(hidden)
    image_proj = {key: _draw(shape, key, gen) for key, shape in shapes.items()}
    ip_adapter: Tensors = {}
    # h94 numbers every attention processor in `unet.attn_processors` order; the cross-attention
    # (attn2) ones hold odd numbers, and only those carry to_k_ip/to_v_ip.
    processors = list(unet.attn_processors)
    for index, name in enumerate(processors):
        if name.endswith("attn2.processor"):
            width = _hidden_size(unet, name)
            for proj in ("to_k_ip", "to_v_ip"):
                key = f"{index}.{proj}.weight"
                ip_adapter[key] = _draw((width, CROSS_ATTENTION_DIM), key, gen)
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


def _hidden_size(unet: Any, processor_name: str) -> int:
    widths = list(unet.config.block_out_channels)
    block = processor_name.split(".")
    if block[0] == "mid_block":
        return int(widths[-1])
    if block[0] == "up_blocks":
        return int(widths[::-1][int(block[1])])
    return int(widths[int(block[1])])


def _plain_proj_shapes(embed_dim: int) -> dict[str, tuple[int, ...]]:
    c = CROSS_ATTENTION_DIM
    return {
        "proj.weight": (PLAIN_TOKENS * c, embed_dim),
        "proj.bias": (PLAIN_TOKENS * c,),
        "norm.weight": (c,),
        "norm.bias": (c,),
    }


def _resampler_shapes(embed_dim: int) -> dict[str, tuple[int, ...]]:
    """The h94 Resampler's keys (IP-Adapter/ip_adapter/resampler.py), scaled down."""
    d, ff = RESAMPLER_DIM, RESAMPLER_DIM * RESAMPLER_FF_MULT
    shapes: dict[str, tuple[int, ...]] = {
        "latents": (1, PLUS_TOKENS, d),
        "proj_in.weight": (d, embed_dim),
        "proj_in.bias": (d,),
        "proj_out.weight": (CROSS_ATTENTION_DIM, d),
        "proj_out.bias": (CROSS_ATTENTION_DIM,),
        "norm_out.weight": (CROSS_ATTENTION_DIM,),
        "norm_out.bias": (CROSS_ATTENTION_DIM,),
    }
    for i in range(RESAMPLER_DEPTH):
        p = f"layers.{i}"
        for norm in ("0.norm1", "0.norm2", "1.0"):
            shapes[f"{p}.{norm}.weight"] = (d,)
            shapes[f"{p}.{norm}.bias"] = (d,)
        shapes |= {f"{p}.0.to_q.weight": (d, d), f"{p}.0.to_kv.weight": (2 * d, d), f"{p}.0.to_out.weight": (d, d)}
        shapes |= {f"{p}.1.1.weight": (ff, d), f"{p}.1.3.weight": (d, ff)}
    return shapes


def _draw(shape: tuple[int, ...], key: str, gen: torch.Generator) -> torch.Tensor:
    noise = torch.randn(shape, generator=gen)
    if "norm" in key or (key.startswith("layers.") and key.endswith(".1.0.weight")):
        return 1.0 + 0.1 * noise if key.endswith("weight") else 0.1 * noise
    scale = shape[-1] ** -0.5 if len(shape) >= 2 else 0.1
    return noise * scale


def _write_adapter(state: dict[str, Tensors], stem: Path) -> None:
    """`.safetensors` with flat `image_proj.*`/`ip_adapter.*` keys, `.bin` nested, as h94 publishes them."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    flat = {f"{part}.{key}": t.contiguous() for part, tensors in state.items() for key, t in tensors.items()}
    save_file(flat, str(stem.with_suffix(".safetensors")))
    torch.save(state, stem.with_suffix(".bin"))


def _write_single_file(pipe: Any, dir: Path) -> None:
    """The base as one `.safetensors` in the original SDXL layout, plus its config folder (no weights)."""
    state = to_original_sdxl(
        unet=pipe.unet.state_dict(),
        vae=pipe.vae.state_dict(),
        text_encoder=pipe.text_encoder.state_dict(),
        text_encoder_2=pipe.text_encoder_2.state_dict(),
        layers_per_block=int(pipe.unet.config.layers_per_block),
    )
    save_file({k: v.contiguous() for k, v in state.items()}, str(dir / "base.safetensors"))
    config = dir / "base_config"
    if config.exists():
        shutil.rmtree(config)
    shutil.copytree(dir / "base", config, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))


# --- the original (Stability "sgm") SDXL key layout, from diffusers' module names ---------------

UNET_RESNET_NAMES: Final = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
UNET_TOP_NAMES: Final = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
VAE_ATTENTION_NAMES: Final = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
OPEN_CLIP_LAYER_NAMES: Final = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


def to_original_sdxl(
    *, unet: Tensors, vae: Tensors, text_encoder: Tensors, text_encoder_2: Tensors, layers_per_block: int
) -> Tensors:
    """Map diffusers SDXL state dicts to one checkpoint in the original SDXL key layout."""
    out: Tensors = {}
    for key, value in unet.items():
        out["model.diffusion_model." + _unet_key(key, layers_per_block, unet)] = value
    for key, value in vae.items():
        new_key, new_value = _vae_item(key, value, _count_blocks(vae, "decoder.up_blocks."))
        out["first_stage_model." + new_key] = new_value
    for key, value in text_encoder.items():
        # transformers >= 5.6 drops the `text_model.` prefix of CLIPTextModel; the original layout has it.
        name = key if key.startswith("text_model.") else "text_model." + key
        out["conditioner.embedders.0.transformer." + name] = value
    out |= {"conditioner.embedders.1.model." + k: v for k, v in _open_clip(text_encoder_2).items()}
    return out


def _count_blocks(state: Tensors, prefix: str) -> int:
    return len({key[len(prefix) :].split(".")[0] for key in state if key.startswith(prefix)})


def _unet_key(key: str, layers: int, unet: Tensors) -> str:
    for new, old in UNET_TOP_NAMES.items():
        if key.startswith(new + "."):
            return old + key[len(new) :]
    parts = key.split(".")
    if parts[0] == "mid_block":
        index = 1 if parts[1] == "attentions" else 2 * int(parts[2])
        return f"middle_block.{index}." + _unet_rest(parts[1], parts[3:]).partition(".")[2]
    block, kind = int(parts[1]), parts[2]
    if parts[0] == "down_blocks":
        if kind == "downsamplers":  # .0.conv.* -> .0.op.*
            return f"input_blocks.{(block + 1) * (layers + 1)}.0.op." + ".".join(parts[5:])
        return f"input_blocks.{1 + block * (layers + 1) + int(parts[3])}." + _unet_rest(kind, parts[4:])
    if kind == "upsamplers":
        has_attention = any(k.startswith(f"up_blocks.{block}.attentions.") for k in unet)
        return f"output_blocks.{block * (layers + 1) + layers}.{2 if has_attention else 1}.conv." + parts[-1]
    return f"output_blocks.{block * (layers + 1) + int(parts[3])}." + _unet_rest(kind, parts[4:])


def _unet_rest(kind: str, rest: list[str]) -> str:
    if kind == "attentions":  # a transformer block keeps its diffusers names
        return "1." + ".".join(rest)
    return "0." + UNET_RESNET_NAMES.get(rest[0], rest[0]) + "." + ".".join(rest[1:])


def _vae_item(key: str, value: torch.Tensor, num_up: int) -> tuple[str, torch.Tensor]:
    part, _, rest = key.partition(".")
    if part in ("quant_conv", "post_quant_conv"):
        return key, value
    rest = rest.replace("conv_norm_out", "norm_out").replace("conv_shortcut", "nin_shortcut")
    pieces = rest.split(".")
    if pieces[0] == "down_blocks":
        kind = "downsample" if pieces[2] == "downsamplers" else "block"
        tail = pieces[4:] if kind == "downsample" else pieces[3:]
        rest = ".".join(["down", pieces[1], kind, *tail])
    elif pieces[0] == "up_blocks":
        kind = "upsample" if pieces[2] == "upsamplers" else "block"
        tail = pieces[4:] if kind == "upsample" else pieces[3:]
        rest = ".".join(["up", str(num_up - 1 - int(pieces[1])), kind, *tail])
    elif pieces[:2] == ["mid_block", "resnets"]:
        rest = ".".join([f"mid.block_{int(pieces[2]) + 1}", *pieces[3:]])
    elif pieces[:2] == ["mid_block", "attentions"]:
        inner = ".".join(pieces[3:-1])
        rest = f"mid.attn_1.{VAE_ATTENTION_NAMES[inner]}.{pieces[-1]}"
        if value.ndim == 2:  # the original attention projections are 1x1 convolutions
            value = value[:, :, None, None]
    return f"{part}.{rest}", value


def _open_clip(state: Tensors) -> Tensors:
    """CLIPTextModelWithProjection -> open_clip's text tower (fused qkv, transposed projection)."""
    out: Tensors = {}
    prefix = "text_model."
    layers = _count_blocks(state, prefix + "encoder.layers.")
    out["token_embedding.weight"] = state[prefix + "embeddings.token_embedding.weight"]
    out["positional_embedding"] = state[prefix + "embeddings.position_embedding.weight"]
    out["ln_final.weight"] = state[prefix + "final_layer_norm.weight"]
    out["ln_final.bias"] = state[prefix + "final_layer_norm.bias"]
    out["text_projection"] = state["text_projection.weight"].T
    for i in range(layers):
        src, dst = f"{prefix}encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            qkv = [state[f"{src}self_attn.{p}_proj.{kind}"] for p in "qkv"]
            out[f"{dst}attn.in_proj_{kind}"] = torch.cat(qkv)
            for new, old in OPEN_CLIP_LAYER_NAMES.items():
                out[f"{dst}{old}.{kind}"] = state[f"{src}{new}.{kind}"]
    return out
