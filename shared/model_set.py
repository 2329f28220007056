"""Model sets: a named base SDXL model + IP-Adapter weights + image encoder (+ LoRAs), read from `model-set.toml`.

    name = "sdxl-plus-vit-h"                # queue-name token: [a-z0-9._-]
    base = "stable-diffusion-xl-base-1.0"   # diffusers folder, hub id, or single-file .safetensors
    base_config = "sdxl_config"             # only with a single-file base: its diffusers config folder
    ip_adapter = "IP-Adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors"   # or .bin
    image_encoder = "IP-Adapter/models/image_encoder"
    loras = [{path = "loras/tcd-sdxl.safetensors", scale = 1.0}]   # optional; safetensors only

    [defaults]                              # optional: job defaults and scheduler options
    [limits]                                # optional: what jobs on this set may ask

LoRAs are fused into the UNet (and the text encoders where they carry weights) once, when the
worker loads the set (`worker.loras`). `[defaults]` and `[limits]` are `shared.model_set_rules`.

Relative paths resolve from the toml's folder. A `base` that is not an existing path but looks
like `org/name` is a hub id (as diffusers' `from_pretrained` decides). No torch here: the
scheduler reads model sets too, on hosts that may not hold the weights, so file checks are a
separate step (`ModelSetConfig.check_files`, which the worker always runs).
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from shared.errors import InvalidInput, ModelSetError
from shared.model_set_rules import NO_RULES, SetRules, parse_rules

BaseKind = Literal["diffusers", "single_file", "hub"]

PATH_KEYS: Final = ("name", "base", "base_config", "ip_adapter", "image_encoder")
TABLE_KEYS: Final = ("loras", "defaults", "limits")
KEYS: Final = (*PATH_KEYS, *TABLE_KEYS)
REQUIRED_KEYS: Final = ("name", "base", "ip_adapter", "image_encoder")
NAME_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
HUB_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
ADAPTER_SUFFIXES: Final = (".safetensors", ".bin")
# Pickle checkpoints can run code when loaded; a single-file base and LoRAs must be safetensors.
PICKLE_SUFFIXES: Final = (".ckpt", ".pt", ".pth", ".bin")
LORA_KEYS: Final = ("path", "scale")
MAX_LORA_SCALE: Final = 4.0


@dataclass(frozen=True)
class LoraFile:
    """One LoRA of a model set: its safetensors file (path resolved) and the scale it is fused at."""

    path: Path
    scale: float = 1.0

    @property
    def name(self) -> str:
        """The name A1111 shows it by (`Lora hashes`): the file name without `.safetensors`."""
        return self.path.stem

    @property
    def label(self) -> str:
        """Its provenance label, as the set's other files have (`loras/<file name>`)."""
        return f"loras/{self.path.name}"


@dataclass(frozen=True)
class ModelSetConfig:
    """One model set, paths resolved. `base` is an absolute path, or a hub id when `base_kind == "hub"`."""

    name: str
    base: str
    base_kind: BaseKind
    base_config: Path | None
    ip_adapter: Path
    image_encoder: Path
    source: Path
    loras: tuple[LoraFile, ...] = ()
    rules: SetRules = NO_RULES

    def check_files(self) -> None:
        """Raise `ModelSetError` naming the key and file when a referenced file or folder is missing."""
        if self.base_kind == "diffusers":
            _require(self, "base", Path(self.base) / "model_index.json", "a diffusers folder with model_index.json")
        elif self.base_kind == "single_file":
            _require(self, "base", Path(self.base), "a single-file .safetensors checkpoint")
            assert self.base_config is not None  # read_model_set guarantees it
            _require(self, "base_config", self.base_config / "model_index.json", "a diffusers config folder")
        _require(self, "ip_adapter", self.ip_adapter, "IP-Adapter weights (.safetensors or .bin)")
        _require(self, "image_encoder", self.image_encoder / "config.json", "a CLIP image encoder folder")
        for index, lora in enumerate(self.loras):
            _require(self, f"loras[{index}].path", lora.path, "a LoRA .safetensors file")


def _require(config: ModelSetConfig, key: str, path: Path, what: str) -> None:
    if not path.is_file():
        raise ModelSetError(f"{config.source}: `{key}`: {path} does not exist; it must be {what}")


def read_model_set(path: Path | str, *, check_files: bool = False) -> ModelSetConfig:
    """Parse and validate a `model-set.toml`; with `check_files`, also require every referenced file."""
    source = Path(path).expanduser().resolve()
    raw = _load_toml(source)
    unknown = sorted(set(raw) - set(KEYS))
    if unknown:
        raise ModelSetError(f"{source}: unknown key `{unknown[0]}`; allowed keys: {', '.join(KEYS)}")
    for key in REQUIRED_KEYS:
        if key not in raw:
            raise ModelSetError(f'{source}: `{key}` is missing; add `{key} = "..."`')
    values = {key: _string(source, key, raw[key]) for key in raw if key in PATH_KEYS}
    name = values["name"]
    if not NAME_PATTERN.fullmatch(name):
        raise ModelSetError(f"{source}: `name` is {name!r}: use 1-64 characters from a-z 0-9 . _ - (it names a queue)")
    base, kind = _resolve_base(source, values["base"])
    base_config = _resolve_base_config(source, kind, values.get("base_config"))
    adapter = _resolve(source, values["ip_adapter"])
    if adapter.suffix not in ADAPTER_SUFFIXES:
        raise ModelSetError(f"{source}: `ip_adapter` is {adapter.name!r}: must end in .safetensors or .bin")
    config = ModelSetConfig(
        name=name,
        base=base,
        base_kind=kind,
        base_config=base_config,
        ip_adapter=adapter,
        image_encoder=_resolve(source, values["image_encoder"]),
        source=source,
        loras=_loras(source, raw.get("loras", [])),
        rules=_rules(source, raw.get("defaults"), raw.get("limits")),
    )
    if check_files:
        config.check_files()
    return config


def _loras(source: Path, value: Any) -> tuple[LoraFile, ...]:
    if not isinstance(value, list):
        raise ModelSetError(f'{source}: `loras` must be a list: loras = [{{path = "x.safetensors", scale = 1.0}}]')
    loras = tuple(_lora(source, index, entry) for index, entry in enumerate(value))
    names = [lora.path.name for lora in loras]
    for index, name in enumerate(names):
        if name in names[:index]:
            raise ModelSetError(f"{source}: `loras[{index}].path`: two LoRAs are named {name!r}; rename one")
    return loras


def _lora(source: Path, index: int, entry: Any) -> LoraFile:
    key = f"loras[{index}]"
    if not isinstance(entry, dict) or "path" not in entry:
        raise ModelSetError(f'{source}: `{key}` is {entry!r}: must be a table {{path = "x.safetensors", scale = 1.0}}')
    unknown = sorted(set(entry) - set(LORA_KEYS))
    if unknown:
        raise ModelSetError(f"{source}: `{key}`: unknown key `{unknown[0]}`; allowed keys: {', '.join(LORA_KEYS)}")
    path = _resolve(source, _string(source, f"{key}.path", entry["path"]))
    if path.suffix in PICKLE_SUFFIXES:
        raise ModelSetError(
            f"{source}: `{key}.path` is {path.name!r}: a {path.suffix} file is a pickle, which can run code when "
            "loaded, so it is refused; use the .safetensors release of this LoRA (or convert it)"
        )
    if path.suffix != ".safetensors":
        raise ModelSetError(f"{source}: `{key}.path` is {path.name!r}: must be a .safetensors file")
    scale = entry.get("scale", 1.0)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not abs(scale) <= MAX_LORA_SCALE:
        bound = f"{MAX_LORA_SCALE:g}"
        raise ModelSetError(f"{source}: `{key}.scale` is {scale!r}: must be a number from -{bound} to {bound}")
    return LoraFile(path=path, scale=float(scale))


def _rules(source: Path, defaults: Any, limits: Any) -> SetRules:
    try:
        return parse_rules(defaults, limits)
    except InvalidInput as e:
        raise ModelSetError(f"{source}: {e}") from None


def _load_toml(source: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(source.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ModelSetError(
            f"model set file {source} does not exist; write one, or fetch the public weights with "
            "`ipab models download DIR`"
        ) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ModelSetError(f"model set file {source} cannot be read: {e}") from None
    except tomllib.TOMLDecodeError as e:
        raise ModelSetError(f"model set file {source} is not valid TOML: {e}") from None


def _string(source: Path, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ModelSetError(f"{source}: `{key}` is {value!r}: must be a non-empty string")
    return value


def _resolve(source: Path, value: str) -> Path:
    path = Path(value).expanduser()
    return path if path.is_absolute() else (source.parent / path).resolve()


def _resolve_base(source: Path, value: str) -> tuple[str, BaseKind]:
    path = _resolve(source, value)
    if path.suffix in PICKLE_SUFFIXES:
        raise ModelSetError(
            f"{source}: `base` is {value!r}: pickle checkpoints can run code when loaded; "
            "convert it to .safetensors or use a diffusers folder"
        )
    if path.suffix == ".safetensors":
        return str(path), "single_file"
    if not path.exists() and HUB_ID_PATTERN.fullmatch(value):
        return value, "hub"
    return str(path), "diffusers"


def _resolve_base_config(source: Path, kind: BaseKind, value: str | None) -> Path | None:
    if kind == "single_file" and value is None:
        raise ModelSetError(
            f"{source}: `base_config` is missing: a single-file base needs its diffusers config folder "
            "(model_index.json, */config.json, tokenizers) so it loads offline"
        )
    if kind != "single_file" and value is not None:
        raise ModelSetError(f"{source}: `base_config` is only for a single-file .safetensors base; remove it")
    return None if value is None else _resolve(source, value)


def write_model_set(
    path: Path,
    *,
    name: str,
    base: str,
    ip_adapter: str,
    image_encoder: str,
    base_config: str | None = None,
    loras: Sequence[tuple[str, float]] = (),
    defaults: Mapping[str, Any] | None = None,
    limits: Mapping[str, Any] | None = None,
) -> None:
    """Write a `model-set.toml` (paths as given: relative ones resolve from `path`'s folder).

    `loras` are (path, scale) pairs; `defaults` and `limits` become the `[defaults]` and
    `[limits]` tables (`shared.model_set_rules`).
    """
    values = {"name": name, "base": base, "base_config": base_config, "ip_adapter": ip_adapter}
    values["image_encoder"] = image_encoder
    lines = [f"{key} = {_toml_value(value)}" for key, value in values.items() if value is not None]
    if loras:
        tables = [f"{{path = {_toml_value(lora)}, scale = {_toml_value(float(scale))}}}" for lora, scale in loras]
        lines.append(f"loras = [{', '.join(tables)}]")
    for table, content in (("defaults", defaults), ("limits", limits)):
        if content:
            lines += ["", f"[{table}]", *(f"{key} = {_toml_value(value)}" for key, value in content.items())]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def _toml_value(value: Any) -> str:
    """A TOML value: JSON strings with ASCII escapes are valid TOML basic strings; floats keep their point."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml_value(item) for item in value) + "]"
    return json.dumps(value)
