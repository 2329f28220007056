"""Adapter weights: both public formats, variant detection, and pickles that try to run code."""

from __future__ import annotations

import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from shared.errors import ModelSetError, UnsafeWeights
from shared.model_set import read_model_set, write_model_set
from worker.weights import describe_adapter, load_adapter_weights

ADAPTERS = "IP-Adapter/sdxl_models"


@pytest.mark.parametrize(
    ("variant", "kind", "tokens"),
    [
        ("ip-adapter_sdxl", "plain", 4),
        ("ip-adapter_sdxl_vit-h", "plain", 4),
        ("ip-adapter-plus_sdxl_vit-h", "plus", 16),
        ("ip-adapter-plus-face_sdxl_vit-h", "plus", 16),
    ],
)
def test_bin_and_safetensors_hold_the_same_weights_and_variant(
    tiny_dir: Path, variant: str, kind: str, tokens: int
) -> None:
    from_bin = load_adapter_weights(tiny_dir / ADAPTERS / f"{variant}.bin")
    from_safetensors = load_adapter_weights(tiny_dir / ADAPTERS / f"{variant}.safetensors")
    for part in ("image_proj", "ip_adapter"):
        assert from_bin[part].keys() == from_safetensors[part].keys()
        assert all(torch.equal(from_bin[part][k], from_safetensors[part][k]) for k in from_bin[part])
    info = describe_adapter(from_bin)
    assert (info.kind, info.tokens, info.layers) == (kind, tokens, 11)


def test_the_tiny_adapters_use_the_h94_key_names(tiny_dir: Path) -> None:
    plain = load_adapter_weights(tiny_dir / ADAPTERS / "ip-adapter_sdxl.bin")
    plus = load_adapter_weights(tiny_dir / ADAPTERS / "ip-adapter-plus_sdxl_vit-h.bin")
    assert set(plain["image_proj"]) == {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}
    assert {"latents", "proj_in.weight", "layers.3.0.to_kv.weight", "layers.3.1.3.weight"} <= set(plus["image_proj"])
    # h94 numbers every attention processor; the cross-attention ones are odd.
    assert sorted(int(k.split(".")[0]) for k in plain["ip_adapter"] if "to_k_ip" in k) == list(range(1, 22, 2))


def test_bigg_and_vit_h_adapters_want_different_embedding_widths(tiny_dir: Path) -> None:
    bigg = describe_adapter(load_adapter_weights(tiny_dir / ADAPTERS / "ip-adapter_sdxl.safetensors"))
    vit_h = describe_adapter(load_adapter_weights(tiny_dir / ADAPTERS / "ip-adapter_sdxl_vit-h.safetensors"))
    assert bigg.embed_dim != vit_h.embed_dim


class _RunsACommand:
    """Pickles into a call of os.system: what a malicious .bin does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (self.command,))


def _malicious_bins(folder: Path, marker: Path) -> list[Path]:
    payload = _RunsACommand(f"touch {marker}")
    zipped, legacy, raw = folder / "zipped.bin", folder / "legacy.bin", folder / "raw.bin"
    torch.save({"image_proj": {"proj.weight": payload}, "ip_adapter": {}}, zipped)
    torch.save({"image_proj": payload}, legacy, _use_new_zipfile_serialization=False)
    raw.write_bytes(pickle.dumps({"image_proj": payload}))
    return [zipped, legacy, raw]


def test_a_bin_whose_pickle_would_run_a_command_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    for path in _malicious_bins(tmp_path, marker):
        with pytest.raises(UnsafeWeights, match="holds more than tensors") as e:
            load_adapter_weights(path)
        assert str(path) in str(e.value) and "weights_only" not in str(e.value)
    assert not marker.exists()


def test_a_model_set_with_a_malicious_bin_fails_to_load_without_running_it(tmp_path: Path, tiny_dir: Path) -> None:
    from worker.pipeline import Renderer

    marker = tmp_path / "pwned"
    evil = _malicious_bins(tmp_path, marker)[0]
    adapter = tmp_path / "ip-adapter_sdxl.bin"
    shutil.copyfile(evil, adapter)
    toml = tmp_path / "model-set.toml"
    encoder = tiny_dir / "IP-Adapter/sdxl_models/image_encoder"
    write_model_set(toml, name="evil", base=str(tiny_dir / "base"), ip_adapter=str(adapter), image_encoder=str(encoder))
    with pytest.raises(UnsafeWeights):
        Renderer.load(read_model_set(toml), device="cpu")
    assert not marker.exists()


def test_files_that_are_no_adapter_are_refused_with_the_path(tmp_path: Path) -> None:
    tensors_only = tmp_path / "other.bin"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, tensors_only)
    with pytest.raises(ModelSetError, match="image_proj"):
        load_adapter_weights(tensors_only)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"not safetensors")
    with pytest.raises(ModelSetError, match=r"garbage\.safetensors"):
        load_adapter_weights(garbage)
    faceid = {"image_proj": {"proj.0.weight": torch.zeros(2, 2)}, "ip_adapter": {"1.to_k_ip.weight": torch.zeros(1)}}
    with pytest.raises(ModelSetError, match="not a supported IP-Adapter layout"):
        describe_adapter(faceid)
