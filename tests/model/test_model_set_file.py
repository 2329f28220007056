"""model-set.toml: keys, path resolution, base kinds, and errors that name the key and the file."""

from __future__ import annotations

from pathlib import Path

import pytest

from shared.errors import ModelSetError
from shared.model_set import read_model_set, write_model_set


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sets" / "model-set.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


GOOD = """
name = "sdxl-plus"
base = "../weights/sdxl"
ip_adapter = "../weights/IP-Adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors"
image_encoder = "../weights/IP-Adapter/models/image_encoder"
"""


def test_relative_paths_resolve_from_the_toml_folder(tmp_path: Path) -> None:
    config = read_model_set(_toml(tmp_path, GOOD))
    assert config.name == "sdxl-plus"
    assert config.base_kind == "diffusers" and config.base == str(tmp_path / "weights" / "sdxl")
    assert config.ip_adapter == tmp_path / "weights/IP-Adapter/sdxl_models/ip-adapter-plus_sdxl_vit-h.safetensors"
    assert config.image_encoder == tmp_path / "weights/IP-Adapter/models/image_encoder"


def test_a_base_that_is_no_local_path_but_looks_like_org_slash_name_is_a_hub_id(tmp_path: Path) -> None:
    config = read_model_set(
        _toml(tmp_path, GOOD.replace("../weights/sdxl", "stabilityai/stable-diffusion-xl-base-1.0"))
    )
    assert (config.base_kind, config.base) == ("hub", "stabilityai/stable-diffusion-xl-base-1.0")


def test_a_single_file_base_needs_its_config_folder(tmp_path: Path) -> None:
    text = GOOD.replace("../weights/sdxl", "bluePencilXL_v200.safetensors")
    with pytest.raises(ModelSetError, match="`base_config` is missing") as e:
        read_model_set(_toml(tmp_path, text))
    assert "model-set.toml" in str(e.value)
    config = read_model_set(_toml(tmp_path, text + 'base_config = "sdxl_config"\n'))
    assert config.base_kind == "single_file" and config.base_config == tmp_path / "sets" / "sdxl_config"


def test_base_config_without_a_single_file_base_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelSetError, match="`base_config` is only for a single-file"):
        read_model_set(_toml(tmp_path, GOOD + 'base_config = "x"\n'))


def test_a_pickle_checkpoint_as_base_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelSetError, match=r"`base`.*pickle"):
        read_model_set(_toml(tmp_path, GOOD.replace("../weights/sdxl", "model.ckpt")))


@pytest.mark.parametrize("key", ["name", "base", "ip_adapter", "image_encoder"])
def test_each_missing_key_is_named(tmp_path: Path, key: str) -> None:
    text = "\n".join(line for line in GOOD.splitlines() if not line.startswith(f"{key} ="))
    with pytest.raises(ModelSetError, match=f"`{key}` is missing") as e:
        read_model_set(_toml(tmp_path, text))
    assert str(tmp_path) in str(e.value)


@pytest.mark.parametrize("name", ["Upper", "has space", "semi;colon", "", "x" * 65])
def test_a_name_that_is_no_queue_token_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ModelSetError, match="`name`"):
        read_model_set(_toml(tmp_path, GOOD.replace('"sdxl-plus"', f'"{name}"')))


def test_unknown_keys_wrong_types_and_bad_toml_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelSetError, match="unknown key `vae`"):
        read_model_set(_toml(tmp_path, GOOD + 'vae = "x"\n'))
    with pytest.raises(ModelSetError, match="`ip_adapter` is 3"):
        lines = [("ip_adapter = 3" if line.startswith("ip_adapter") else line) for line in GOOD.splitlines()]
        read_model_set(_toml(tmp_path, "\n".join(lines)))
    with pytest.raises(ModelSetError, match="not valid TOML"):
        read_model_set(_toml(tmp_path, "name = "))
    with pytest.raises(ModelSetError, match="does not exist"):
        read_model_set(tmp_path / "missing.toml")


def test_an_adapter_that_is_neither_safetensors_nor_bin_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelSetError, match=r"`ip_adapter`.*must end in \.safetensors or \.bin"):
        read_model_set(_toml(tmp_path, GOOD.replace("vit-h.safetensors", "vit-h.pt")))


def test_check_files_names_the_key_of_a_missing_file(tmp_path: Path) -> None:
    path = _toml(tmp_path, GOOD)
    read_model_set(path)  # the scheduler reads names without the weights
    with pytest.raises(ModelSetError, match=r"`base`.*model_index\.json"):
        read_model_set(path, check_files=True)


def test_write_model_set_round_trips(tmp_path: Path) -> None:
    path = tmp_path / "m.toml"
    write_model_set(
        path, name="a.b_c-1", base="b.safetensors", base_config="cfg", ip_adapter="a.bin", image_encoder="e"
    )
    config = read_model_set(path)
    assert (config.name, config.base_kind, config.ip_adapter.name) == ("a.b_c-1", "single_file", "a.bin")


FAST = (
    GOOD
    + 'loras = [{path = "../weights/loras/tcd.safetensors"}, {path = "/abs/lightning.safetensors", scale = 0.5}]\n'
    + '\n[defaults]\nscheduler = "tcd"\nsteps = 4\nguidance_scale = 0\neta = 0.3\ntimestep_spacing = "trailing"\n'
    + '\n[limits]\nsteps = [2, 8]\nguidance_scale = [0.0, 2.0]\nscheduler = ["tcd", "lcm"]\n'
)


def test_loras_defaults_and_limits_are_read_and_checked(tmp_path: Path) -> None:
    config = read_model_set(_toml(tmp_path, FAST))
    assert [(lora.path, lora.scale) for lora in config.loras] == [
        (tmp_path / "weights/loras/tcd.safetensors", 1.0),
        (Path("/abs/lightning.safetensors"), 0.5),
    ]
    rules = config.rules
    assert rules.defaults == {"scheduler": "tcd", "steps": 4, "guidance_scale": 0.0}
    assert rules.scheduler_options == {"eta": 0.3, "timestep_spacing": "trailing"}
    assert rules.ranges == {"steps": (2, 8), "guidance_scale": (0.0, 2.0)} and rules.schedulers == ("tcd", "lcm")
    assert read_model_set(_toml(tmp_path, GOOD)).rules.empty  # a set without them: jobs as ever


def test_a_model_set_written_with_loras_defaults_and_limits_reads_back_the_same(tmp_path: Path) -> None:
    first = read_model_set(_toml(tmp_path, FAST))
    path = tmp_path / "again" / "model-set.toml"
    write_model_set(
        path,
        name=first.name,
        base=first.base,
        ip_adapter=str(first.ip_adapter),
        image_encoder=str(first.image_encoder),
        loras=[(str(lora.path), lora.scale) for lora in first.loras],
        defaults={**first.rules.defaults, **first.rules.scheduler_options},
        limits=first.rules.to_json()["limits"],
    )
    again = read_model_set(path)
    assert (again.loras, again.rules) == (first.loras, first.rules)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('loras = "x.safetensors"\n', "`loras` must be a list"),
        ('loras = [{file = "x.safetensors"}]\n', r"`loras\[0\]` is"),
        ('loras = [{path = "x.safetensors", weight = 1}]\n', r"`loras\[0\]`: unknown key `weight`"),
        ('loras = [{path = "x.safetensors", scale = "1"}]\n', r"`loras\[0\].scale` is '1'"),
        ('loras = [{path = "x.safetensors", scale = 9}]\n', r"from -4 to 4"),
        ('loras = [{path = "x.onnx"}]\n', r"`loras\[0\].path` is 'x.onnx': must be a .safetensors file"),
        ('loras = [{path = "a/x.safetensors"}, {path = "b/x.safetensors"}]\n', r"`loras\[1\].path`: two LoRAs"),
        ("[defaults]\nprompt = 'x'\n", "`defaults.prompt` is 'x': is not a job field nor a scheduler option"),
        ("[defaults]\nsteps = 0\n", "`defaults.steps` is 0: must be from 1 to 150"),
        ("[defaults]\nscheduler = 'turbo'\n", "`defaults.scheduler` is 'turbo': must be one of"),
        ("[defaults]\neta = 2\n", "`defaults.eta` is 2: must be a number from 0 to 1"),
        ("[defaults]\ntimestep_spacing = 'last'\n", "`defaults.timestep_spacing` is 'last'"),
        ("[defaults]\nsteps = 30\n[limits]\nsteps = [2, 8]\n", "`defaults.steps` is 30: lies outside"),
        ("[limits]\nsteps = [2, 8]\n", "`limits.steps` is 30: excludes the global default steps"),
        ("[limits]\nsteps = [8, 2]\n", r"`limits.steps` is \[8, 2\]: must be \[low, high\]"),
        ("[limits]\nguidance_scale = [0, 'x']\n", r"0 <= low <= high <= 30, e.g. guidance_scale = \[0.0, 2.0\]"),
        ("[limits]\nseed = [0, 1]\n", "`limits.seed` is .*: is not a limit"),
        ("[limits]\nscheduler = ['turbo']\n", "`limits.scheduler` is"),
        ("defaults = 3\n", "`defaults` is 3: must be a table"),
    ],
)
def test_bad_loras_defaults_and_limits_are_refused_naming_the_key(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ModelSetError, match=message) as e:
        read_model_set(_toml(tmp_path, GOOD + text))
    assert str(tmp_path) in str(e.value)


def test_check_files_names_a_missing_lora(tmp_path: Path, tiny_sets: dict[str, Path]) -> None:
    fast = read_model_set(tiny_sets["fast"])
    toml = tmp_path / "model-set.toml"
    write_model_set(
        toml,
        name="x",
        base=fast.base,
        ip_adapter=str(fast.ip_adapter),
        image_encoder=str(fast.image_encoder),
        loras=[("gone.safetensors", 1.0)],
    )
    with pytest.raises(ModelSetError, match=r"`loras\[0\].path`: .*gone.safetensors does not exist"):
        read_model_set(toml, check_files=True)
