"""`python -m devkit synth`, `ipab generate` and `ipab models download` (against a local fake of the hub)."""

from __future__ import annotations

import io
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from devkit.__main__ import main as devkit_main
from ipab.cli import main
from shared.model_set import read_model_set
from tests.model.conftest import job, reference_image


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_models_synth_writes_the_same_bytes_for_the_same_seed(tmp_path: Path, tiny_dir: Path) -> None:
    assert devkit_main(["synth", str(tmp_path / "again"), "--seed", "0"]) == 0
    again, first = _files(tmp_path / "again"), _files(tiny_dir)
    assert again.keys() == first.keys()
    assert [name for name in first if first[name] != again[name]] == []
    assert "random" in (tmp_path / "again" / "README.md").read_text().lower()


def test_the_synth_layout_is_the_public_one(tiny_dir: Path, tiny_sets: dict[str, Path]) -> None:
    expected = [
        "base/model_index.json",
        "base/unet/diffusion_pytorch_model.safetensors",
        "base/text_encoder_2/model.safetensors",
        "base/tokenizer/vocab.json",
        "base/tokenizer/merges.txt",
        "base_config/unet/config.json",
        "base.safetensors",
        "IP-Adapter/sdxl_models/image_encoder/model.safetensors",
        "IP-Adapter/models/image_encoder/config.json",
        "IP-Adapter/sdxl_models/ip-adapter-plus-face_sdxl_vit-h.bin",
        "loras/tiny-tcd-lora.safetensors",
        "loras/tiny-kohya-lora.safetensors",
        "model-set-fast.toml",
    ]
    assert all((tiny_dir / name).is_file() for name in expected)
    assert not list((tiny_dir / "base_config").rglob("*.safetensors"))
    plain = [k for k in tiny_sets if k not in ("default", "fast", "fast.kohya")]
    assert len(plain) == 16  # 4 variants x 2 formats x 2 base layouts
    from safetensors import safe_open

    with safe_open(str(tiny_dir / "base.safetensors"), framework="pt") as f:
        keys = set(f.keys())
    assert "model.diffusion_model.output_blocks.2.2.conv.weight" in keys  # up_blocks.0 upsampler
    assert "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight" in keys
    assert "first_stage_model.decoder.up.0.block.0.norm1.weight" in keys


def test_ipab_generate_writes_the_png_the_worker_path_makes(
    tmp_path: Path, tiny_sets: dict[str, Path], renderer_for: Callable[[str], Any]
) -> None:
    from worker.png import encode_png
    from worker.provenance import Provenance, model_set_hashes

    reference = tmp_path / "ref.jpg"
    reference_image(60).save(reference, format="JPEG", quality=95)
    out = tmp_path / "out" / "fox.png"
    argv = ["generate", "--model-set", str(tiny_sets["default"]), "--reference", str(reference), "--prompt", "a fox"]
    argv += ["--seed", "9", "--width", "64", "--height", "64", "--steps", "4", "--ip-adapter-scale", "style"]
    assert main([*argv, "--out", str(out)]) == 0
    written = out.read_bytes()
    assert "Seed: 9" in Image.open(io.BytesIO(written)).text["parameters"]  # type: ignore[attr-defined]
    # The worker's path, by hand: decode_reference -> encode -> generate -> encode_png.
    from shared.images import decode_reference

    renderer, params = renderer_for("default"), job(prompt="a fox", seed=9, ip_adapter_scale="style")
    image = renderer.generate(params, renderer.encode([decode_reference(reference.read_bytes())]))
    provenance = Provenance.of(renderer, hashes=model_set_hashes(renderer.config))
    assert written == encode_png(image, params=params, model_set=renderer.name, provenance=provenance)


def _fake_hub(tiny_dir: Path, root: Path) -> Path:
    """The tiny set laid out as the two hub repositories (fp16-variant names for the base)."""
    base = root / "stabilityai/stable-diffusion-xl-base-1.0"
    shutil.copytree(tiny_dir / "base", base)
    for weights in list(base.rglob("*.safetensors")):
        weights.rename(weights.with_name(weights.name.replace(".safetensors", ".fp16.safetensors")))
    shutil.copytree(tiny_dir / "IP-Adapter", root / "h94/IP-Adapter")
    return root


def test_models_download_fetches_the_public_layout_and_writes_loadable_model_sets(
    tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    hub = _fake_hub(tiny_dir, tmp_path / "hub")
    fetched: list[str] = []

    def fake_download(*, repo_id: str, filename: str, local_dir: Path) -> str:
        fetched.append(f"{repo_id}/{filename}")
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(hub / repo_id / filename, target)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    dest = tmp_path / "models"
    assert main(["models", "download", str(dest), "--variant", "ip-adapter-plus_sdxl_vit-h"]) == 0
    assert not [name for name in fetched if name.endswith(".bin")]  # safetensors only, never pickles
    assert "h94/IP-Adapter/models/image_encoder/model.safetensors" in fetched
    assert "h94/IP-Adapter/sdxl_models/image_encoder/model.safetensors" not in fetched  # not needed by this variant
    config = read_model_set(dest / "model-set-ip-adapter-plus_sdxl_vit-h.toml", check_files=True)
    assert config.name == "ip-adapter-plus_sdxl_vit-h"

    from worker.pipeline import Renderer

    renderer = Renderer.load(config, device="cpu")
    image = renderer.generate(job(), renderer.encode([reference_image(61)]))
    assert image.size == (64, 64)
    before = len(fetched)
    assert main(["models", "download", str(dest), "--variant", "ip-adapter-plus_sdxl_vit-h"]) == 0
    assert len(fetched) == before  # files already there are not fetched again


PRESET_FILES = {
    "tcd": ("h1t/TCD-SDXL-LoRA/pytorch_lora_weights.safetensors", "tiny-tcd-lora"),
    "lcm": ("latent-consistency/lcm-lora-sdxl/pytorch_lora_weights.safetensors", "tiny-tcd-lora"),
    "lightning-4step": ("ByteDance/SDXL-Lightning/sdxl_lightning_4step_lora.safetensors", "tiny-kohya-lora"),
    "lightning-8step": ("ByteDance/SDXL-Lightning/sdxl_lightning_8step_lora.safetensors", "tiny-kohya-lora"),
}


def test_models_download_preset_writes_a_fast_set_that_loads_and_runs_its_defaults(
    tmp_path: Path, tiny_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    hub = _fake_hub(tiny_dir, tmp_path / "hub")
    for hub_file, tiny in PRESET_FILES.values():  # the tiny LoRAs standing in for the distilled ones
        (hub / hub_file).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(tiny_dir / "loras" / f"{tiny}.safetensors", hub / hub_file)
    fetched: list[str] = []

    def fake_download(*, repo_id: str, filename: str, local_dir: Path) -> str:
        fetched.append(f"{repo_id}/{filename}")
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(hub / repo_id / filename, target)
        return str(target)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    dest = tmp_path / "models"
    expected = {
        "tcd": ("tcd", 4, 0.0, {"eta": 0.3}, (2, 8)),
        "lcm": ("lcm", 4, 1.0, {}, (2, 8)),
        "lightning-4step": ("euler_trailing", 4, 0.0, {}, (4, 4)),
        "lightning-8step": ("euler_trailing", 8, 0.0, {}, (8, 8)),
    }
    for preset, (scheduler, steps, guidance, options, step_limits) in expected.items():
        assert main(["models", "download", str(dest), "--preset", preset]) == 0
        assert PRESET_FILES[preset][0] in fetched
        config = read_model_set(dest / f"model-set-{preset}.toml", check_files=True)
        assert config.name == f"ip-adapter_sdxl-{preset}"
        assert [lora.path.parent.name for lora in config.loras] == ["loras"] and config.loras[0].scale == 1.0
        defaults = config.rules.defaults
        assert (defaults["scheduler"], defaults["steps"], defaults["guidance_scale"]) == (scheduler, steps, guidance)
        assert config.rules.scheduler_options == options and config.rules.ranges["steps"] == step_limits
    assert not [name for name in fetched if not name.endswith((".safetensors", ".json", ".txt"))]

    from shared.spec import parse_params
    from worker.pipeline import Renderer

    renderer = Renderer.load(read_model_set(dest / "model-set-tcd.toml"), device="cpu")
    params = parse_params({**renderer.config.rules.defaults, "prompt": "a fox", "seed": 1, "width": 64, "height": 64})
    assert renderer.generate(params, renderer.encode([reference_image(62)])).size == (64, 64)


def test_models_download_without_a_network_says_what_to_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import huggingface_hub

    def offline(**kwargs: Any) -> str:
        raise huggingface_hub.errors.LocalEntryNotFoundError("offline mode is enabled")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    assert main(["models", "download", str(tmp_path), "--skip-base"]) == 2
    assert "cannot download h94/IP-Adapter/" in capsys.readouterr().err
    assert main(["models", "download", str(tmp_path), "--variant", "ip-adapter_sd15"]) == 2


def test_the_readmes_preset_table_says_what_each_preset_writes() -> None:
    from worker.commands import PRESET_NAMES
    from worker.download import PRESETS

    readme = (Path(__file__).parents[2] / "README.md").read_text(encoding="utf-8")
    rows = {line.split("|")[1].strip(" `"): line for line in readme.splitlines() if line.startswith("| `")}
    for name in PRESET_NAMES:
        preset, row = PRESETS[name], rows[name]
        defaults = preset.defaults
        assert preset.repo in row, row
        assert f"`{defaults['scheduler']}`, {defaults['steps']}, {defaults['guidance_scale']:g}" in row, row
        low, high = preset.limits["steps"]
        assert (f"steps {low}-{high}" if low != high else f"steps {low}") in row, row
