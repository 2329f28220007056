"""IP-Adapter weights: read them safely and tell which variant they are.

`.safetensors` holds flat `image_proj.*` / `ip_adapter.*` keys; `.bin` (h94's original format)
is a pickle of `{"image_proj": {...}, "ip_adapter": {...}}`. A pickle can run code while it
loads, so `.bin` files go through `torch.load(weights_only=True)` only: anything but tensors
in plain containers is refused with `UnsafeWeights`, and nothing in the file is executed.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from shared.errors import ModelSetError, UnsafeWeights

AdapterState = dict[str, dict[str, torch.Tensor]]
AdapterKind = Literal["plain", "plus"]

PARTS: Final = ("image_proj", "ip_adapter")
# diffusers builds every plain (ImageProjModel) adapter with 4 tokens, whatever the weights say.
PLAIN_TOKENS: Final = 4


@dataclass(frozen=True)
class AdapterInfo:
    """What an adapter's weights say about it, and so which image encoder it needs."""

    kind: AdapterKind  # "plain": projected image embeds; "plus": Resampler over penultimate hidden states
    embed_dim: int  # encoder width it consumes: projection_dim (plain) or hidden_size (plus)
    tokens: int  # image tokens per reference image
    cross_attention_dim: int  # the UNet's text width it was trained for (SDXL: 2048)
    layers: int  # cross-attention layers it patches (SDXL: 70)

    @property
    def encoder_width_name(self) -> str:
        """The image-encoder config field that must equal `embed_dim`."""
        return "projection_dim" if self.kind == "plain" else "hidden_size"


def load_adapter_weights(path: Path) -> AdapterState:
    """Read `.safetensors` or `.bin` adapter weights into `{"image_proj": {...}, "ip_adapter": {...}}`."""
    if path.suffix == ".safetensors":
        return _from_safetensors(path)
    if path.suffix == ".bin":
        return _from_pickle(path)
    raise ModelSetError(f"`ip_adapter`: {path} must be .safetensors or .bin")


def _from_safetensors(path: Path) -> AdapterState:
    try:
        flat = load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ModelSetError(f"`ip_adapter`: {path} is not a readable safetensors file: {e}") from None
    state: AdapterState = {part: {} for part in PARTS}
    for key, tensor in flat.items():
        part, _, rest = key.partition(".")
        if part in state and rest:
            state[part][rest] = tensor
    return _checked(state, path)


def _from_pickle(path: Path) -> AdapterState:
    try:
        # weights_only: the unpickler only builds tensors and plain containers; any other
        # global (os.system, a class with __reduce__, ...) is refused before it is called.
        raw = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeWeights(
            f"`ip_adapter`: {path} holds more than tensors, so it was not loaded (nothing in it ran): "
            f"{_unpickler_reason(e)}. Use the .safetensors release of these weights"
        ) from None
    except (OSError, RuntimeError, EOFError) as e:
        raise ModelSetError(f"`ip_adapter`: {path} is not a readable torch .bin file: {e}") from None
    if not isinstance(raw, dict) or not all(isinstance(raw.get(part), dict) for part in PARTS):
        raise ModelSetError(f"`ip_adapter`: {path} must hold {{'image_proj': {{...}}, 'ip_adapter': {{...}}}}")
    state = {part: dict(raw[part]) for part in PARTS}
    return _checked(state, path)


def _unpickler_reason(error: pickle.UnpicklingError) -> str:
    # torch's message suggests `weights_only=False`; keep only the line that says what was found.
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    found = [line for line in lines if "GLOBAL" in line or "Unsupported" in line or "unsupported" in line]
    return (found or lines or [type(error).__name__])[0][:200].rstrip(".")


def _checked(state: dict[str, dict[str, Any]], path: Path) -> AdapterState:
    for part in PARTS:
        if not state[part]:
            raise ModelSetError(f"`ip_adapter`: {path} has no `{part}.*` weights; is it an IP-Adapter file?")
        for key, value in state[part].items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise ModelSetError(f"`ip_adapter`: {path}: `{part}.{key}` is not a tensor")
    return state


def describe_adapter(state: AdapterState, *, path: Path | str = "ip_adapter") -> AdapterInfo:
    """Detect the variant from the weights: plain (ImageProjModel) or plus (Resampler); widths; tokens."""
    proj = state["image_proj"]
    layers = sum(1 for key in state["ip_adapter"] if key.endswith(".to_k_ip.weight"))
    if "proj.weight" in proj and "norm.weight" in proj:
        cross = int(proj["norm.weight"].shape[0])
        tokens = int(proj["proj.weight"].shape[0]) // cross
        if tokens != PLAIN_TOKENS:
            raise ModelSetError(f"`ip_adapter`: {path} has {tokens} image tokens; diffusers supports {PLAIN_TOKENS}")
        return AdapterInfo("plain", int(proj["proj.weight"].shape[1]), tokens, cross, layers)
    if "latents" in proj and "proj_in.weight" in proj and "proj_out.weight" in proj:
        return AdapterInfo(
            kind="plus",
            embed_dim=int(proj["proj_in.weight"].shape[1]),
            tokens=int(proj["latents"].shape[1]),
            cross_attention_dim=int(proj["proj_out.weight"].shape[0]),
            layers=layers,
        )
    raise ModelSetError(
        f"`ip_adapter`: {path} is not a supported IP-Adapter layout (plain `image_proj.proj.*` or plus "
        "`image_proj.latents` + `proj_in`); FaceID and full-face adapters are not supported"
    )


def cast_adapter(state: AdapterState, dtype: torch.dtype) -> AdapterState:
    """The same weights in `dtype` (h94 ships fp16; a CPU pipeline runs fp32)."""
    return {part: {k: v.to(dtype) for k, v in tensors.items()} for part, tensors in state.items()}
