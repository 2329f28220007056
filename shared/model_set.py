"""Model sets: a named base SDXL model + IP-Adapter weights + image encoder, read from `model-set.toml`.

    name = "sdxl-plus-vit-h"                # queue-name token: [a-z0-9._-]
    base = "stable-diffusion-xl-base-1.0"   # diffusers folder, hub id, or single-file .safetensors
    base_config = "sdxl_config"             # only with a single-file base: its diffusers config folder
    ip_adapter = "IP-Adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors"   # or .bin
    image_encoder = "IP-Adapter/models/image_encoder"

Relative paths resolve from the toml's folder. A `base` that is not an existing path but looks
like `org/name` is a hub id (as diffusers' `from_pretrained` decides). No torch here: the
scheduler reads model sets too, on hosts that may not hold the weights, so file checks are a
separate step (`ModelSetConfig.check_files`, which the worker always runs).
"""

from __future__ import annotations

import json
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal

from shared.errors import ModelSetError

BaseKind = Literal["diffusers", "single_file", "hub"]

KEYS: Final = ("name", "base", "base_config", "ip_adapter", "image_encoder")
REQUIRED_KEYS: Final = ("name", "base", "ip_adapter", "image_encoder")
NAME_PATTERN: Final = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
HUB_ID_PATTERN: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*")
ADAPTER_SUFFIXES: Final = (".safetensors", ".bin")
# Pickle checkpoints can run code when loaded; a single-file base must be safetensors.
PICKLE_SUFFIXES: Final = (".ckpt", ".pt", ".pth", ".bin")


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
    values = {key: _string(source, key, raw[key]) for key in raw}
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
    )
    if check_files:
        config.check_files()
    return config


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
) -> None:
    """Write a `model-set.toml` (paths as given: relative ones resolve from `path`'s folder)."""
    values = {"name": name, "base": base, "base_config": base_config, "ip_adapter": ip_adapter}
    values["image_encoder"] = image_encoder
    # JSON strings with ASCII escapes are valid TOML basic strings.
    lines = [f"{key} = {json.dumps(value)}" for key, value in values.items() if value is not None]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
