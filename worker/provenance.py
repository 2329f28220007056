"""Provenance: what made an output, as data: the sha256 of every weight file of the model set,
the library versions, the device and the dtype.

    hashes = model_set_hashes(config)                    # cached by (path, size, mtime)
    record = Provenance.of(renderer, hashes=hashes)      # once per worker process
    record.to_text()                                     # jobs.provenance, the PNG's ipab JSON

Files are labelled `<model-set key>/<path inside it>` (`base/unet/diffusion_pytorch_model.safetensors`,
`ip_adapter/ip-adapter_sdxl.safetensors`, `image_encoder/model.safetensors`,
`loras/tcd-sdxl-lora.safetensors`), so two copies of a model set in different folders compare
equal. Weight files and the small config and tokenizer files are hashed: everything that changes
the pixels. What else of the set changes them is recorded beside: each LoRA's scale (`loras`:
name, sha256, scale, in fusing order) and the scheduler options (`scheduler_options`).

`model_hash` is what A1111 writes as `Model hash:`: the first 10 hex digits of the sha256 of
the checkpoint. For a single-file base that is the file itself (the same hash A1111 and model
sites show); for a diffusers folder it is the UNet's weights file
(`unet/diffusion_pytorch_model.safetensors`); when the UNet is sharded or absent, the sha256 of
the base's sorted `label sha256` lines.

Hashing a 7 GB SDXL set takes about a minute, so the digests are cached in a JSON file beside
the model-set toml (`.ipab-sha256.json`; in `~/.cache/ipab/` when that folder is read-only),
keyed by absolute path, size and mtime: a restarted worker re-hashes only what changed.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import os
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Final

from shared.model_set import ModelSetConfig

log = logging.getLogger(__name__)

HASHED_SUFFIXES: Final = (".safetensors", ".bin", ".ckpt", ".pt", ".pth", ".gguf", ".json", ".txt", ".model")
CACHE_NAME: Final = ".ipab-sha256.json"
HOME_CACHE: Final = Path("~/.cache/ipab") / "sha256.json"
CHUNK_BYTES: Final = 16 * 1024 * 1024
MODEL_HASH_CHARS: Final = 10  # A1111's short hash
UNET_WEIGHTS: Final = "base/unet/diffusion_pytorch_model.safetensors"
LIBRARIES: Final = ("ipab", "diffusers", "transformers", "torch")


@dataclass(frozen=True)
class ModelSetHashes:
    """The sha256 of every hashed file of a model set, by label, and A1111's short `model_hash`."""

    files: dict[str, str]
    model_hash: str


@dataclass(frozen=True)
class Provenance:
    """How a job's output was made: model set, weight digests, library versions, device and dtype."""

    model_set: str
    model_hash: str
    files: dict[str, str]
    versions: dict[str, str]
    device: str
    device_name: str
    dtype: str
    cpu_threads: int  # torch's intra-op threads: CPU float reductions (so pixels) depend on it
    loras: list[dict[str, Any]] = field(default_factory=list)  # {name, sha256, scale}, in fusing order
    scheduler_options: dict[str, Any] = field(default_factory=dict)  # the set's (`[defaults]`), e.g. eta

    @classmethod
    def of(cls, renderer: Any, *, hashes: ModelSetHashes) -> Provenance:
        """The record for a loaded `Renderer` whose model set has these file digests."""
        config: ModelSetConfig = renderer.config
        return cls(
            model_set=renderer.name,
            model_hash=hashes.model_hash,
            files=dict(hashes.files),
            versions=library_versions(),
            device=str(renderer.device),
            device_name=device_name(renderer.device),
            dtype=str(renderer.dtype).removeprefix("torch."),
            cpu_threads=_cpu_threads(),
            loras=lora_records(config, hashes),
            scheduler_options=dict(config.rules.scheduler_options),
        )

    def lora_hashes(self) -> dict[str, str]:
        """A1111's short hash (10 hex digits) of each LoRA, by name."""
        return {lora["name"]: str(lora["sha256"])[:MODEL_HASH_CHARS] for lora in self.loras}

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready dict (the `jobs.provenance` column and the PNG's ipab chunk)."""
        return asdict(self)

    def to_text(self) -> str:
        """Stable JSON text (sorted keys): the same provenance gives the same bytes."""
        return json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"))


def lora_records(config: ModelSetConfig, hashes: ModelSetHashes) -> list[dict[str, Any]]:
    """Each LoRA of the set as provenance holds it: name, sha256 and scale, in fusing order."""
    return [{"name": lora.name, "sha256": hashes.files.get(lora.label), "scale": lora.scale} for lora in config.loras]


def setting_differences(recorded: dict[str, Any], config: ModelSetConfig) -> list[str]:
    """One line per LoRA scale or scheduler option that differs between a record and a local set.

    The LoRA files themselves are compared with the other files (`compare_files`).
    """
    lines = []
    was = {lora.get("name"): lora.get("scale") for lora in recorded.get("loras", [])}
    now = {lora.name: lora.scale for lora in config.loras}
    for name in sorted(set(was) | set(now)):
        if was.get(name) != now.get(name):
            lines.append(f"LoRA {name}: scale {now.get(name)} here, {was.get(name)} in the record")
    options, before = dict(config.rules.scheduler_options), dict(recorded.get("scheduler_options", {}))
    if options != before:
        lines.append(f"scheduler options: {options} here, {before} in the record")
    return lines


def library_versions() -> dict[str, str]:
    """Installed versions of ipab and of the libraries that render (`unknown` if one has no metadata)."""
    versions: dict[str, str] = {}
    for name in LIBRARIES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "unknown"
    return versions


def device_name(device: Any) -> str:
    """The accelerator's model (GPU kernels differ between models), or `cpu`."""
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        return str(torch.cuda.get_device_name(device))
    return "cpu"


def compare_files(recorded: dict[str, str], local: dict[str, str]) -> list[str]:
    """One line per file that differs between a recorded model set and a local one (empty: same weights)."""
    lines = []
    for label in sorted(set(recorded) | set(local)):
        was, now = recorded.get(label), local.get(label)
        if was == now:
            continue
        if was is None:
            lines.append(f"{label}: not in the record (only here)")
        elif now is None:
            lines.append(f"{label}: missing here (recorded sha256 {was})")
        else:
            lines.append(f"{label}: sha256 {now} here, {was} in the record")
    return lines


def _cpu_threads() -> int:
    import torch

    return int(torch.get_num_threads())


def model_set_hashes(config: ModelSetConfig, *, use_cache: bool = True) -> ModelSetHashes:
    """Hash every weight and config file of the model set; unchanged files come from the cache."""
    cache = HashCache.beside(config.source) if use_cache else HashCache(None)
    files = {label: cache.sha256(path) for label, path in model_set_files(config).items()}
    cache.save()
    return ModelSetHashes(files=files, model_hash=_model_hash(config, files))


def model_set_files(config: ModelSetConfig) -> dict[str, Path]:
    """The files that make the model set's pixels, by label `<key>/<path inside it>`, sorted."""
    roots: list[tuple[str, Path | None]] = [("base", _base_root(config))]
    if config.base_config is not None:
        roots.append(("base_config", config.base_config))
    roots += [("ip_adapter", config.ip_adapter), ("image_encoder", config.image_encoder)]
    roots += [("loras", lora.path) for lora in config.loras]
    files: dict[str, Path] = {}
    for key, root in roots:
        for relative, path in _hashed_files(root):
            files[f"{key}/{relative}"] = path
    return files


def _base_root(config: ModelSetConfig) -> Path | None:
    if config.base_kind != "hub":
        return Path(config.base)
    from huggingface_hub import snapshot_download

    try:  # the snapshot diffusers loaded from; never a download here
        return Path(snapshot_download(config.base, local_files_only=True))
    except Exception as e:  # any miss: the record then lacks the base's files
        log.warning(
            "model set %s: base %s is not in the local hub cache (%s); its files are not hashed",
            config.name,
            config.base,
            e,
        )
        return None


def _hashed_files(root: Path | None) -> Iterator[tuple[str, Path]]:
    """`(relative name, path)` of a file, or of each hashed file under a folder (hidden ones skipped)."""
    if root is None or not root.exists():
        return
    if root.is_file():
        yield root.name, root
        return
    for path in sorted(root.rglob("*")):
        relative = path.relative_to(root)
        if path.suffix in HASHED_SUFFIXES and path.is_file() and not any(p.startswith(".") for p in relative.parts):
            yield relative.as_posix(), path


def _model_hash(config: ModelSetConfig, files: dict[str, str]) -> str:
    """A1111's `Model hash` (see the module docstring): the single file, the UNet, or the base combined."""
    main = f"base/{Path(config.base).name}" if config.base_kind == "single_file" else UNET_WEIGHTS
    if main in files:
        return files[main][:MODEL_HASH_CHARS]
    base = sorted((label, digest) for label, digest in files.items() if label.startswith("base/"))
    lines = "".join(f"{label} {digest}\n" for label, digest in base)
    return hashlib.sha256(lines.encode()).hexdigest()[:MODEL_HASH_CHARS]


def file_sha256(path: Path) -> str:
    """The sha256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class HashCache:
    """File digests keyed by absolute path, size and mtime, kept in a small JSON file (or nowhere)."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._entries: dict[str, dict[str, Any]] = _read_cache(path) if path else {}
        self._dirty = False

    @classmethod
    def beside(cls, source: Path) -> HashCache:
        """The cache in the model-set toml's folder, or in `~/.cache/ipab` when that folder is read-only."""
        folder = source.parent
        return cls(folder / CACHE_NAME if os.access(folder, os.W_OK) else HOME_CACHE.expanduser())

    def sha256(self, path: Path) -> str:
        """The file's sha256: from the cache while its size and mtime are unchanged, else computed."""
        stat = path.stat()
        key = str(path.resolve())
        entry = self._entries.get(key)
        if entry and entry.get("size") == stat.st_size and entry.get("mtime_ns") == stat.st_mtime_ns:
            return str(entry["sha256"])
        log.info("hashing %s (%d MB)", path, stat.st_size // 1_000_000)
        digest = file_sha256(path)
        self._entries[key] = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns, "sha256": digest}
        self._dirty = True
        return digest

    def save(self) -> None:
        """Write the cache atomically (concurrent workers: the last writer wins, every entry stays true)."""
        if not self._dirty or self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".sha256-", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self._entries, f, indent=1, sort_keys=True)
            os.replace(tmp, self.path)
            self._dirty = False
        except OSError as e:
            log.warning("could not write the sha256 cache %s (%s); the files are hashed again next start", self.path, e)


def _read_cache(path: Path) -> dict[str, dict[str, Any]]:
    try:
        entries = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}
