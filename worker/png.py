"""PNG output: deterministic bytes that carry their generation parameters.

The `parameters` text chunk follows AUTOMATIC1111's convention, so image browsers and
"PNG info" tools show the prompt and settings; the `ipab` chunk holds the same as JSON for
exact reproduction. No timestamps and fixed compression: the same job gives the same bytes.

With a provenance record (`worker.provenance`), `parameters` also carries A1111's
`Model hash:` (10 hex digits of the base checkpoint's sha256) and `Version:` (`ipab 0.1.0`), and
the `ipab` JSON carries the whole record: every weight file's sha256, the library versions,
the device and the dtype. A set with LoRAs adds A1111's `Lora hashes: "name: hash10, ..."` and
the same as `Hashes: {"model": ..., "lora:name": ...}` (the JSON form Civitai and sd-parsers read).
"""

from __future__ import annotations

import io
import json
from typing import Final

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from shared.spec import GenerationParams
from worker.provenance import Provenance

# A1111's names for our schedulers.
SAMPLER_NAMES: Final = {
    "euler": "Euler",
    "euler_a": "Euler a",
    "dpmpp_2m": "DPM++ 2M",
    "dpmpp_2m_karras": "DPM++ 2M Karras",
    "ddim": "DDIM",
    "tcd": "TCD",
    "lcm": "LCM",
    "euler_trailing": "Euler",
}
# A1111's `Schedule type` where the sampler name alone does not say it (trailing spacing is "SGM Uniform").
SCHEDULE_TYPES: Final = {"euler_trailing": "SGM Uniform"}
COMPRESS_LEVEL: Final = 6


def parameters_text(params: GenerationParams, *, model_set: str, provenance: Provenance | None = None) -> str:
    """The A1111 `parameters` text: prompt, optional negative prompt line, then `Key: value` pairs
    in A1111's order (`Model hash` before `Model`, `Version` last)."""
    lines = [params.prompt]
    if params.negative_prompt:
        lines.append(f"Negative prompt: {params.negative_prompt}")
    settings = {
        "Steps": str(params.steps),
        "Sampler": SAMPLER_NAMES.get(params.scheduler, params.scheduler),
        **({"Schedule type": SCHEDULE_TYPES[params.scheduler]} if params.scheduler in SCHEDULE_TYPES else {}),
        "CFG scale": _number(params.guidance_scale),
        "Seed": str(params.seed),
        "Size": f"{params.width}x{params.height}",
        **({"Model hash": provenance.model_hash} if provenance else {}),
        "Model": model_set,
        "IP-Adapter scale": _adapter_scale(params),
        **(_lora_settings(provenance) if provenance and provenance.loras else {}),
        **({"Version": f"ipab {provenance.versions['ipab']}"} if provenance else {}),
    }
    lines.append(", ".join(f"{key}: {_quote(value) if key != 'Hashes' else value}" for key, value in settings.items()))
    return "\n".join(lines)


def _lora_settings(provenance: Provenance) -> dict[str, str]:
    """`Lora hashes` as A1111 writes it (names without `:` or `,`), and `Hashes` JSON (written unquoted)."""
    hashes = {name.replace(":", "").replace(",", ""): short for name, short in provenance.lora_hashes().items()}
    civitai = {"model": provenance.model_hash, **{f"lora:{name}": short for name, short in hashes.items()}}
    return {
        "Lora hashes": ", ".join(f"{name}: {short}" for name, short in hashes.items()),
        "Hashes": json.dumps(civitai, separators=(", ", ": ")),
    }


def encode_png(
    image: Image.Image, *, params: GenerationParams, model_set: str, provenance: Provenance | None = None
) -> bytes:
    """PNG bytes of `image` with the `parameters` and `ipab` text chunks; identical for identical input."""
    info = PngInfo()
    info.add_text("parameters", parameters_text(params, model_set=model_set, provenance=provenance))
    record = {"model_set": model_set, "params": params.to_json()}
    if provenance is not None:
        record["provenance"] = provenance.to_json()
    info.add_text("ipab", json.dumps(record, sort_keys=True))
    out = io.BytesIO()
    image.convert("RGB").save(out, format="PNG", pnginfo=info, compress_level=COMPRESS_LEVEL, optimize=False)
    return out.getvalue()


def _number(value: float) -> str:
    return f"{value:g}"


def _adapter_scale(params: GenerationParams) -> str:
    scale = params.ip_adapter_scale
    if isinstance(scale, (int, float)):
        return _number(scale)
    if isinstance(scale, str):
        return scale
    return json.dumps(scale, sort_keys=True, separators=(",", ":"))


def _quote(value: str) -> str:
    # A1111 quotes a value (as a JSON string) when it holds a separator.
    return json.dumps(value) if any(ch in value for ch in ",:\n") else value
