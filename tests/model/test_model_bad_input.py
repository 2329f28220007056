"""Every kind of bad input is refused before model work, naming the field, at each public entry point."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from ipab.cli import main
from shared.errors import InvalidInput
from shared.spec import parse_params
from tests.model.conftest import job, png_bytes, reference_image

# (what is wrong, the parameter override, the `ipab generate` flags, the field the error names)
CASES = [
    ("width not a multiple of 8", {"width": 65}, ["--width", "65"], "width"),
    ("height out of range", {"height": 4096}, ["--height", "4096"], "height"),
    ("height below the minimum", {"height": 32}, ["--height", "32"], "height"),
    ("zero steps", {"steps": 0}, ["--steps", "0"], "steps"),
    ("NaN guidance", {"guidance_scale": float("nan")}, ["--guidance-scale", "nan"], "guidance_scale"),
    ("negative seed", {"seed": -1}, ["--seed", "-1"], "seed"),
    ("seed of 2**63", {"seed": 2**63}, ["--seed", str(2**63)], "seed"),
    ("unknown scheduler", {"scheduler": "heun"}, ["--scheduler", "heun"], "scheduler"),
    (
        "unknown InstantStyle block",
        {"ip_adapter_scale": {"up": {"block_9": 1.0}}},
        ["--ip-adapter-scale", '{"up": {"block_9": 1.0}}'],
        "ip_adapter_scale.up.block_9",
    ),
    (
        "unknown InstantStyle preset",
        {"ip_adapter_scale": "stylez"},
        ["--ip-adapter-scale", "stylez"],
        "ip_adapter_scale",
    ),
]
IDS = [case[0] for case in CASES]


@pytest.mark.parametrize(("override", "field"), [(c[1], c[3]) for c in CASES], ids=IDS)
def test_parse_params_names_the_bad_field(override: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidInput) as e:
        job(**override)
    assert e.value.field == field and f"`{field}`" in str(e.value)


@pytest.mark.parametrize(("override", "field"), [(c[1], c[3]) for c in CASES], ids=IDS)
def test_generate_revalidates_parameters_built_without_the_validator(
    renderer_for: Callable[[str], Any], override: dict[str, Any], field: str
) -> None:
    renderer = renderer_for("default")
    embeds = renderer.encode([reference_image(50)])
    unchecked = dataclasses.replace(job(), **override)  # a message from an older scheduler, say
    with pytest.raises(InvalidInput) as e:
        renderer.generate(unchecked, embeds)
    assert e.value.field == field


def test_generate_refuses_an_empty_reference_list_and_foreign_embeddings(renderer_for: Callable[[str], Any]) -> None:
    renderer = renderer_for("default")
    with pytest.raises(InvalidInput) as e:
        renderer.generate(job(), [])
    assert e.value.field == "references"
    plus = renderer_for("ip-adapter-plus_sdxl_vit-h.safetensors")
    with pytest.raises(InvalidInput, match="re-encode") as e:
        renderer.generate(job(), plus.encode([reference_image(51)]))
    assert e.value.field == "reference embeddings"


@pytest.fixture
def generate_cli(
    tiny_sets: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., tuple[int, str, Path]]:
    """Run `ipab generate` in-process; model loading is made to fail, so only input checks can answer."""
    from worker.pipeline import Renderer

    def no_model(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(Renderer, "load", no_model)
    reference = tmp_path / "ref.png"
    reference.write_bytes(png_bytes(reference_image(52)))
    out = tmp_path / "out.png"

    def run(*flags: str, references: tuple[Path, ...] = (reference,)) -> tuple[int, str, Path]:
        argv = ["generate", "--model-set", str(tiny_sets["default"]), "--prompt", "a fox", "--out", str(out)]
        argv += [arg for ref in references for arg in ("--reference", str(ref))]
        try:
            code = main([*argv, *flags])
        except SystemExit as e:  # argparse's own refusals
            code = int(e.code or 0)
        return code, capsys.readouterr().err, out

    return run


@pytest.mark.parametrize(("flags", "field"), [(c[2], c[3]) for c in CASES], ids=IDS)
def test_ipab_generate_exits_2_naming_the_field(
    generate_cli: Callable[..., tuple[int, str, Path]], flags: list[str], field: str
) -> None:
    code, err, out = generate_cli(*flags)
    assert code == 2 and f"`{field}`" in err and not out.exists()


def test_ipab_generate_refuses_an_undecodable_image(
    generate_cli: Callable[..., tuple[int, str, Path]], tmp_path: Path
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(png_bytes(reference_image(53))[:200])  # truncated
    code, err, out = generate_cli(references=(broken,))
    assert code == 2 and f"`reference {broken}`" in err and not out.exists()
    text = tmp_path / "notes.png"
    text.write_bytes(b"these are notes, not an image")
    code, err, _ = generate_cli(references=(text,))
    assert code == 2 and "`reference" in err and "not an image" in err


def test_ipab_generate_needs_a_reference(generate_cli: Callable[..., tuple[int, str, Path]]) -> None:
    code, err, _ = generate_cli(references=())
    assert code == 2 and "--reference" in err


def test_a_preset_name_and_json_block_scales_are_accepted_by_the_validator() -> None:
    assert parse_params({"prompt": "x", "seed": 1, "ip_adapter_scale": "style_and_layout"}).block_scales() == {
        "down": {"block_2": [0.0, 1.0]},
        "up": {"block_0": [0.0, 1.0, 0.0]},
    }
