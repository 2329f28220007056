"""The job spec: generation parameters and references, validated once, frozen, JSON on the wire.

Every bad value raises `InvalidInput` naming the field, showing the value and saying what
is allowed, before any model work. The scheduler validates at the edge; the worker
validates again with the same code (a message may come from an older scheduler).
"""

from __future__ import annotations

import functools
import json
import math
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, cast

from shared.errors import InvalidInput
from shared.scheduler_names import SCHEDULERS as SCHEDULERS
from shared.scheduler_names import Scheduler as Scheduler

SEED_LIMIT: Final = 2**63
MIN_SIDE_PX: Final = 64
MAX_SIDE_PX: Final = 2048
SIDE_MULTIPLE_PX: Final = 8
MAX_STEPS: Final = 150
MAX_GUIDANCE: Final = 30.0
MAX_ADAPTER_SCALE: Final = 2.0
MAX_PROMPT_CHARS: Final = 2000
MAX_REFERENCES: Final = 8
MAX_BATCH_NAME_CHARS: Final = 200  # the width of `batches.name`
# Unicode categories Cc (fixed by Unicode's stability policy) and Cs, less tab and newline:
# one regex search instead of a per-character category lookup (tested over every code point).
_CONTROL_CHARS: Final = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\ud800-\udfff]")
# Built once: `json.dumps(separators=...)` builds a new encoder on every call.
_COMPACT: Final = json.JSONEncoder(separators=(",", ":"))

# Per-block scales as diffusers' `set_ip_adapter_scale` takes them: the number of
# attention layers in each SDXL transformer block that carries cross-attention.
SDXL_BLOCK_LAYERS: Final[dict[str, dict[str, int]]] = {
    "down": {"block_1": 2, "block_2": 2},
    "mid": {},
    "up": {"block_0": 3, "block_1": 3},
}
# InstantStyle presets. `style` scales only up_blocks.0.attentions.1 (as DiffSynth's
# `ipadapter_use_instant_style`); `style_and_layout` adds down_blocks.2.attentions.1.
INSTANT_STYLE_PRESETS: Final[dict[str, dict[str, Any]]] = {
    "style": {"up": {"block_0": [0.0, 1.0, 0.0]}},
    "style_and_layout": {"down": {"block_2": [0.0, 1.0]}, "up": {"block_0": [0.0, 1.0, 0.0]}},
}

BlockScales = dict[str, Any]
AdapterScale = float | str | BlockScales

DEFAULTS: Final[dict[str, Any]] = {
    "negative_prompt": "",
    "width": 1024,
    "height": 1024,
    "steps": 30,
    "guidance_scale": 5.0,
    "ip_adapter_scale": 0.6,
    "scheduler": "euler",
}
PARAM_FIELDS: Final = (
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "ip_adapter_scale",
    "scheduler",
)


@dataclass(frozen=True)
class GenerationParams:
    """Everything but the reference images that decides one generated image."""

    prompt: str
    seed: int
    negative_prompt: str = ""
    width: int = 1024
    height: int = 1024
    steps: int = 30
    guidance_scale: float = 5.0
    ip_adapter_scale: AdapterScale = 0.6
    scheduler: str = "euler"

    def batch_key(self) -> str:
        """Jobs with equal keys may share one forward pass (same size, steps, scheduler, scales)."""
        shared = (self.width, self.height, self.steps, self.scheduler, self.guidance_scale)
        return json.dumps([*shared, self.ip_adapter_scale], sort_keys=True)

    def block_scales(self) -> float | BlockScales:
        """The adapter scale in the form diffusers' `set_ip_adapter_scale` takes."""
        if isinstance(self.ip_adapter_scale, str):
            return INSTANT_STYLE_PRESETS[self.ip_adapter_scale]
        return self.ip_adapter_scale

    def to_json(self) -> dict[str, Any]:
        """A plain JSON-able dict; `parse_params(p.to_json()) == p`."""
        # Not dataclasses.asdict: this runs twice per row of a 100k-row submit, and
        # asdict's generic deep copy costs ten times more than these few fields.
        out = {name: getattr(self, name) for name in PARAM_FIELDS}
        if isinstance(self.ip_adapter_scale, dict):
            out["ip_adapter_scale"] = json.loads(json.dumps(self.ip_adapter_scale))
        return out


@dataclass(frozen=True)
class Reference:
    """One reference image in object storage, content-addressed by its sha256."""

    sha256: str
    key: str


@dataclass(frozen=True)
class JobSpec:
    """A full job: parameters plus the reference images, in order (their tokens concatenate)."""

    params: GenerationParams
    references: tuple[Reference, ...] = field(default_factory=tuple)

    def to_text(self) -> str:
        """The spec as compact JSON text, as SQL stores it and messages carry it.

        The one serializer of a spec: `parse_spec(json.loads(s.to_text())) == s`.
        """
        params = _COMPACT.encode(self.params.to_json())
        return f'{{"params":{params},"references":{_references_text(self.references)}}}'

    def to_json(self) -> dict[str, Any]:
        """`to_text` as a plain JSON-able dict; `parse_spec(s.to_json()) == s`."""
        return dict(json.loads(self.to_text()))


@functools.lru_cache(maxsize=4096)
def _references_text(references: tuple[Reference, ...]) -> str:
    # Cached: a 100k-row submit serializes a spec per row over a few distinct reference sets.
    return _COMPACT.encode([{"sha256": r.sha256, "key": r.key} for r in references])


def _check_int(name: str, value: Any, low: int, high: int, hint: str = "") -> int:
    # bool is an int in Python; `true` is never a seed or a size.
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidInput(name, value, f"must be a whole number from {low} to {high}{hint}")
    if not low <= value <= high:
        raise InvalidInput(name, value, f"must be from {low} to {high}{hint}")
    return value


def _check_float(name: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidInput(name, value, f"must be a number from {low} to {high}")
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidInput(name, value, f"must be a finite number from {low} to {high}")
    return float(value)


def check_text(name: str, value: Any) -> str:
    """A prompt: a string of at most MAX_PROMPT_CHARS, no control characters but tab and newline."""
    if not isinstance(value, str):
        raise InvalidInput(name, value, "must be a string")
    if len(value) > MAX_PROMPT_CHARS:
        raise InvalidInput(name, value, f"must be at most {MAX_PROMPT_CHARS} characters, is {len(value)}")
    bad = _CONTROL_CHARS.search(value)
    if bad is not None:
        raise InvalidInput(name, value, f"contains control character {bad.group()!r}; remove it")
    return value


def check_batch_name(value: Any, *, field: str = "--batch") -> str:
    """A batch name: a prompt's rules (`check_text`), and one printable line of 1-200 characters.

    Names are printed raw in tab-separated listings (`ipab batches`), so tabs, line breaks
    and invisible format characters (bidi overrides, zero-width) are refused, not escaped.
    """
    name = check_text(field, value)
    if not 0 < len(name) <= MAX_BATCH_NAME_CHARS or name != name.strip():
        limits = f"must be 1 to {MAX_BATCH_NAME_CHARS} characters without leading or trailing spaces"
        raise InvalidInput(field, value, limits)
    for char in name:
        if char in "\t\n" or unicodedata.category(char) in ("Cf", "Zl", "Zp"):
            raise InvalidInput(field, value, f"contains {char!r}, which breaks listings; use printable characters")
    return name


def check_seed(value: Any) -> int:
    """A seed: a whole number with 0 <= seed < 2**63 (it must fit a signed 64-bit column)."""
    return _check_int("seed", value, 0, SEED_LIMIT - 1, " (0 <= seed < 2**63)")


def check_side(name: str, value: Any) -> int:
    """A width or height in pixels: a multiple of 8 within the model's range."""
    side = _check_int(name, value, MIN_SIDE_PX, MAX_SIDE_PX)
    if side % SIDE_MULTIPLE_PX:
        lower = side - side % SIDE_MULTIPLE_PX
        raise InvalidInput(name, value, f"must be a multiple of {SIDE_MULTIPLE_PX} (try {lower} or {lower + 8})")
    return side


def _check_block_scales(value: Mapping[str, Any]) -> BlockScales:
    name = "ip_adapter_scale"
    for part, blocks in value.items():
        if part not in SDXL_BLOCK_LAYERS:
            raise InvalidInput(f"{name}.{part}", value, f"unknown part; allowed: {sorted(SDXL_BLOCK_LAYERS)}")
        if part == "mid":
            _check_float(f"{name}.mid", blocks, 0.0, MAX_ADAPTER_SCALE)
            continue
        if not isinstance(blocks, Mapping):
            raise InvalidInput(f"{name}.{part}", blocks, "must map block names (block_N) to scales")
        for block, scale in blocks.items():
            layers = SDXL_BLOCK_LAYERS[part].get(block)
            where = f"{name}.{part}.{block}"
            if layers is None:
                allowed = sorted(SDXL_BLOCK_LAYERS[part])
                raise InvalidInput(where, scale, f"unknown SDXL block; {part} blocks with attention: {allowed}")
            scales = scale if isinstance(scale, list) else [scale]
            if isinstance(scale, list) and len(scale) != layers:
                raise InvalidInput(where, scale, f"must be one number or a list of {layers} numbers")
            for s in scales:
                _check_float(where, s, 0.0, MAX_ADAPTER_SCALE)
    return cast(BlockScales, json.loads(json.dumps(dict(value))))  # a deep, plain copy


def check_adapter_scale(value: Any) -> AdapterScale:
    """A float, an InstantStyle preset name, or per-block scales as diffusers takes them."""
    if isinstance(value, str):
        if value in INSTANT_STYLE_PRESETS:
            return value
        try:
            value = float(value)
        except ValueError:
            allowed = f"a number from 0 to {MAX_ADAPTER_SCALE}, or one of {sorted(INSTANT_STYLE_PRESETS)}"
            raise InvalidInput("ip_adapter_scale", value, f"must be {allowed}") from None
    if isinstance(value, Mapping):
        return _check_block_scales(value)
    return _check_float("ip_adapter_scale", value, 0.0, MAX_ADAPTER_SCALE)


def check_scheduler(value: Any) -> str:
    """A scheduler name from SCHEDULERS."""
    if value not in SCHEDULERS:
        raise InvalidInput("scheduler", value, f"must be one of {', '.join(SCHEDULERS)}")
    return str(value)


def parse_params(raw: Mapping[str, Any]) -> GenerationParams:
    """Validate a mapping of parameters (defaults filled in) into `GenerationParams`.

    Raises `InvalidInput` for the first bad field, naming it.
    """
    unknown = sorted(set(raw) - set(PARAM_FIELDS))
    if unknown:
        raise InvalidInput(unknown[0], raw[unknown[0]], f"unknown field; allowed: {', '.join(PARAM_FIELDS)}")
    merged = {**DEFAULTS, **raw}
    if "prompt" not in merged:
        raise InvalidInput("prompt", None, "is required")
    if "seed" not in merged:
        raise InvalidInput("seed", None, "is required (the scheduler draws one when a row has none)")
    return GenerationParams(
        prompt=check_text("prompt", merged["prompt"]),
        negative_prompt=check_text("negative_prompt", merged["negative_prompt"]),
        seed=check_seed(merged["seed"]),
        width=check_side("width", merged["width"]),
        height=check_side("height", merged["height"]),
        steps=_check_int("steps", merged["steps"], 1, MAX_STEPS),
        guidance_scale=_check_float("guidance_scale", merged["guidance_scale"], 0.0, MAX_GUIDANCE),
        ip_adapter_scale=check_adapter_scale(merged["ip_adapter_scale"]),
        scheduler=check_scheduler(merged["scheduler"]),
    )


def parse_spec(raw: Any) -> JobSpec:
    """Validate a decoded JSON job spec (`{"params": ..., "references": [...]}`)."""
    if not isinstance(raw, Mapping):
        raise InvalidInput("spec", raw, "must be a JSON object with `params` and `references`")
    params_raw = raw.get("params")
    if not isinstance(params_raw, Mapping):
        raise InvalidInput("params", params_raw, "must be a JSON object of generation parameters")
    refs_raw = raw.get("references")
    if not isinstance(refs_raw, list) or not refs_raw:
        raise InvalidInput("references", refs_raw, "must be a non-empty list of reference images")
    if len(refs_raw) > MAX_REFERENCES:
        raise InvalidInput("references", len(refs_raw), f"at most {MAX_REFERENCES} reference images per job")
    refs = []
    for ref in refs_raw:
        sha = ref.get("sha256") if isinstance(ref, Mapping) else None
        key = ref.get("key") if isinstance(ref, Mapping) else None
        if not isinstance(sha, str) or len(sha) != 64 or any(c not in "0123456789abcdef" for c in sha):
            raise InvalidInput("references.sha256", sha, "must be 64 lowercase hex digits")
        if not isinstance(key, str) or not key.startswith("refs/"):
            raise InvalidInput("references.key", key, "must be an object key under refs/")
        refs.append(Reference(sha256=sha, key=key))
    return JobSpec(params=parse_params(params_raw), references=tuple(refs))
