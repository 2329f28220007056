"""A model set's LoRAs, fused into the base once at load: the fused model is what runs.

    fuse_loras(pipe, config)     # after `load_ip_adapter`, before the pipeline is placed

Each LoRA is read from its `.safetensors` file (never a pickle: `shared.model_set` refuses
those), loaded through diffusers' `load_lora_weights` (which reads the diffusers/PEFT layout
and kohya's `lora_unet_*` / `lora_te*_*` layout), fused at its scale into the UNet and, where
it has weights for them, the text encoders (`fuse_lora`), and then its PEFT layers are removed
(`unload_lora_weights`) before the next one loads: the merged weights add up, no per-step LoRA
cost remains.

It runs after the IP-Adapter is loaded: PEFT wraps the attention's linear layers and leaves the
attention processors alone, so the IP-Adapter's processors stay in place (`fuse_loras` checks).

A LoRA that does not fit the base fails the load with a `ModelSetError` naming its key and file:
wrong shapes, no module to go into, or only some of its layers finding one (diffusers only warns
about those; a half-applied LoRA would make wrong images silently).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from shared.errors import ModelSetError
from shared.model_set import LoraFile, ModelSetConfig

log = logging.getLogger(__name__)

COMPONENTS: Final = ("unet", "text_encoder", "text_encoder_2")
# The key endings of one LoRA layer's down (A) matrix, in the layouts diffusers converts to.
DOWN_SUFFIXES: Final = ("lora_A.weight", "lora.down.weight", "lora_down.weight", "lora_linear_layer.down.weight")


def fuse_loras(pipe: Any, config: ModelSetConfig) -> None:
    """Load, fuse and unload every LoRA of the set, in order; `ModelSetError` naming one that does not fit."""
    if not config.loras:
        return
    processors = _processor_types(pipe.unet)
    for index, lora in enumerate(config.loras):
        key = f"{config.source}: `loras[{index}]` {lora.path.name}"
        state = read_lora(lora, key=key)
        name = f"ipab_lora_{index}"
        with _quiet_loaders():
            _load(pipe, state, name=name, key=key)
            pipe.fuse_lora(components=list(COMPONENTS), lora_scale=lora.scale, adapter_names=[name])
            # Each one's PEFT layers go before the next loads: loading into a merged model unmerges it
            # (peft: "Adapter cannot be set when the model is merged"), so only the last would stay fused.
            pipe.unload_lora_weights()
        log.info("LoRA %s fused at scale %s", lora.path.name, lora.scale)
    _check_fused(pipe, processors, config=config)


def read_lora(lora: LoraFile, *, key: str) -> dict[str, torch.Tensor]:
    """The LoRA's tensors from its safetensors file (read here, so diffusers never unpickles anything)."""
    try:
        state = load_file(str(lora.path), device="cpu")
    except (SafetensorError, OSError) as e:
        raise ModelSetError(f"{key} is not a readable safetensors file: {e}") from None
    if not state:
        raise ModelSetError(f"{key} holds no tensors; is it a LoRA?")
    return state


def _load(pipe: Any, state: dict[str, torch.Tensor], *, name: str, key: str) -> None:
    expected = _layer_count(pipe, state, key=key)
    try:
        pipe.load_lora_weights(dict(state), adapter_name=name)
    except (ValueError, RuntimeError, KeyError) as e:
        # peft's NoMatchingPeftModuleError is a ValueError; a size mismatch a RuntimeError.
        reason = " ".join(str(e).split())[:400]
        raise ModelSetError(f"{key} does not fit the base model ({reason}); use a LoRA made for SDXL") from None
    loaded = sum(_adapter_layers(getattr(pipe, component), name) for component in COMPONENTS)
    if loaded != expected:
        raise ModelSetError(
            f"{key} does not fit the base model: only {loaded} of its {expected} layers match a module of the "
            "UNet or text encoders; use a LoRA made for SDXL"
        )


def _layer_count(pipe: Any, state: dict[str, torch.Tensor], *, key: str) -> int:
    """How many LoRA layers the file holds, counted in the layout diffusers converts it to."""
    try:
        converted, _alphas = pipe.lora_state_dict(dict(state), unet_config=pipe.unet.config)
    except (ValueError, KeyError, RuntimeError) as e:
        raise ModelSetError(f"{key} is not a LoRA layout diffusers reads (diffusers/PEFT or kohya): {e}") from None
    return sum(1 for k in converted if k.endswith(DOWN_SUFFIXES))


def _adapter_layers(model: Any, name: str) -> int:
    from peft.tuners.tuners_utils import BaseTunerLayer

    if model is None:
        return 0
    return sum(1 for m in model.modules() if isinstance(m, BaseTunerLayer) and name in getattr(m, "lora_A", {}))


def _processor_types(unet: Any) -> dict[str, str]:
    return {name: type(processor).__name__ for name, processor in unet.attn_processors.items()}


def _check_fused(pipe: Any, processors: dict[str, str], *, config: ModelSetConfig) -> None:
    """No PEFT layer left anywhere, and the IP-Adapter's attention processors as they were."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for component in COMPONENTS:
        model = getattr(pipe, component, None)
        if model is not None and any(isinstance(m, BaseTunerLayer) for m in model.modules()):
            raise ModelSetError(f"{config.source}: LoRA layers remain in `{component}` after fusing (diffusers bug?)")
    if _processor_types(pipe.unet) != processors:
        raise ModelSetError(f"{config.source}: fusing the LoRAs replaced the IP-Adapter's attention processors")


@contextmanager
def _quiet_loaders() -> Iterator[None]:
    """diffusers and transformers print a report per component while a LoRA loads; this module says
    what matters (a LoRA that does not fit is an error), so their reports go to debug level."""
    loggers = [logging.getLogger(name) for name in ("diffusers", "transformers", "peft")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)
