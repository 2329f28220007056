"""Provenance: every weight file's sha256 (cached), and a PNG that common tools read it from."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from shared.model_set import read_model_set
from tests.model.conftest import job
from worker import provenance as prov
from worker.png import encode_png
from worker.provenance import Provenance, compare_files, model_set_hashes
from worker.reproduce import compare_pngs


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_every_weight_file_of_base_adapter_and_encoder_is_hashed(tiny_sets: dict[str, Path], tiny_dir: Path) -> None:
    hashes = model_set_hashes(read_model_set(tiny_sets["default"]), use_cache=False)
    unet = tiny_dir / "base/unet/diffusion_pytorch_model.safetensors"
    assert hashes.files["base/unet/diffusion_pytorch_model.safetensors"] == sha256_of(unet)
    assert hashes.files["base/text_encoder_2/model.safetensors"] == sha256_of(
        tiny_dir / "base/text_encoder_2/model.safetensors"
    )
    assert "base/model_index.json" in hashes.files and "base/tokenizer/vocab.json" in hashes.files
    adapter = tiny_dir / "IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors"
    assert hashes.files["ip_adapter/ip-adapter_sdxl.safetensors"] == sha256_of(adapter)
    encoder = tiny_dir / "IP-Adapter/sdxl_models/image_encoder/model.safetensors"
    assert hashes.files["image_encoder/model.safetensors"] == sha256_of(encoder)
    # Only the files this model set names: not the other adapters or the single-file base.
    assert not any("vit-h" in label or label == "base/base.safetensors" for label in hashes.files)
    # A1111's Model hash of a diffusers base: its UNet weights file, 10 hex digits.
    assert hashes.model_hash == sha256_of(unet)[:10]


def test_a_single_file_base_has_the_files_own_hash_as_its_model_hash(
    tiny_sets: dict[str, Path], tiny_dir: Path
) -> None:
    hashes = model_set_hashes(read_model_set(tiny_sets["ip-adapter_sdxl.safetensors.single_file"]), use_cache=False)
    assert hashes.model_hash == sha256_of(tiny_dir / "base.safetensors")[:10]
    assert "base/base.safetensors" in hashes.files
    assert any(label.startswith("base_config/") for label in hashes.files)


def test_hashes_are_cached_by_path_size_and_mtime(
    tiny_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "models"
    shutil.copytree(tiny_dir, folder, ignore=shutil.ignore_patterns(".ipab-sha256.json"))
    config = read_model_set(folder / "model-set.toml")
    first = model_set_hashes(config)
    assert (folder / ".ipab-sha256.json").is_file()  # beside the model set: a restarted worker reads it
    hashed: list[Path] = []
    real = prov.file_sha256

    def counting(path: Path) -> str:
        hashed.append(path)
        return real(path)

    monkeypatch.setattr(prov, "file_sha256", counting)
    assert model_set_hashes(config) == first
    assert hashed == []  # nothing read again
    adapter = folder / "IP-Adapter/sdxl_models/ip-adapter_sdxl.safetensors"
    data = bytearray(adapter.read_bytes())
    data[-1] ^= 0xFF
    adapter.write_bytes(bytes(data))
    again = model_set_hashes(config)
    assert hashed == [adapter]  # only the changed file
    assert compare_files(first.files, again.files) == [
        f"ip_adapter/ip-adapter_sdxl.safetensors: sha256 {sha256_of(adapter)} here, "
        f"{first.files['ip_adapter/ip-adapter_sdxl.safetensors']} in the record"
    ]


def test_the_png_parameters_carry_model_hash_and_version_that_sd_parsers_reads(
    renderer_for: Callable[[str], Any], tiny_sets: dict[str, Path]
) -> None:
    sd_parsers = pytest.importorskip("sd_parsers")
    renderer = renderer_for("default")
    record = Provenance.of(renderer, hashes=model_set_hashes(renderer.config))
    params = job(prompt="a fox", negative_prompt="blurry", seed=7, guidance_scale=5.0)
    data = encode_png(Image.new("RGB", (64, 64)), params=params, model_set=renderer.name, provenance=record)
    text = Image.open(io.BytesIO(data)).text  # type: ignore[attr-defined]
    assert text["parameters"].endswith(
        f"Steps: 4, Sampler: Euler, CFG scale: 5, Seed: 7, Size: 64x64, Model hash: {record.model_hash}, "
        f"Model: {renderer.name}, IP-Adapter scale: 0.6, Version: ipab {record.versions['ipab']}"
    )
    info = sd_parsers.ParserManager().parse(Image.open(io.BytesIO(data)))
    assert info is not None and info.generator.name == "AUTOMATIC1111"
    sampler = info.samplers[0]
    assert (sampler.model.name, sampler.model.hash) == (renderer.name, record.model_hash)
    assert sampler.parameters["seed"] == "7" and sampler.prompts[0].value == "a fox"
    assert info.metadata["Version"] == f"ipab {record.versions['ipab']}"
    ipab = json.loads(text["ipab"])["provenance"]
    assert ipab["files"] == model_set_hashes(renderer.config).files
    assert (ipab["device"], ipab["dtype"]) == ("cpu", "float32")
    assert set(ipab["versions"]) == {"ipab", "diffusers", "transformers", "torch"}


def test_comparing_pngs_says_identical_bytes_identical_pixels_or_the_largest_difference() -> None:
    params = job()
    pixels = np.zeros((8, 8, 3), dtype=np.uint8)
    png = encode_png(Image.fromarray(pixels), params=params, model_set="m")
    assert compare_pngs(png, png).verdict == "identical bytes"
    renamed = encode_png(Image.fromarray(pixels), params=params, model_set="other")
    assert (compare_pngs(png, renamed).verdict, compare_pngs(png, renamed).max_pixel_diff) == ("identical pixels", 0)
    pixels[3, 4, 1] = 9
    changed = compare_pngs(png, encode_png(Image.fromarray(pixels), params=params, model_set="m"))
    assert (changed.verdict, changed.max_pixel_diff, changed.reproduced) == ("pixels differ", 9, False)
