"""The control plane is a light install: every scheduler command works where torch cannot be imported,
the worker's commands say what to install, and the import layers are enforced."""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from shared.settings import Settings

REPO = Path(__file__).resolve().parents[2]
EXPORT_FORMAT = "parquet" if importlib.util.find_spec("pyarrow") else "imagefolder"


@pytest.fixture
def light_ipab(
    settings: Settings,
    settings_env: Callable[[Settings], dict[str, str]],
    ipab_without_gpu_stack: Callable[..., subprocess.CompletedProcess[str]],
    tmp_path: Path,
) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`run(*argv)`: `ipab ARGV` in a subprocess where importing torch, diffusers or transformers raises."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPAB_")}
    env.update(settings_env(settings.model_copy(update={"reference_roots": [tmp_path]})))

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return ipab_without_gpu_stack(env, *argv)

    return run


def test_every_control_plane_command_runs_without_torch(
    light_ipab: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    Image.new("RGB", (32, 32), (200, 40, 40)).save(tmp_path / "ref.png")
    rows = [f'{{"reference": "ref.png", "prompt": "row {i}", "seed": {i}}}' for i in range(3)]
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    (tmp_path / "grid.toml").write_text('[axes]\nprompts = ["a", "b"]\nreferences = ["ref.png"]\nseeds = 2\n')

    submit = light_ipab("submit", "rows.jsonl", "--batch", "light", "--model-set", "tiny-light")
    assert submit.returncode == 0, submit.stderr
    assert "3 job(s) added" in submit.stdout
    for argv, expected in [
        (("status", "light"), "queued"),
        (("results", "light"), '"status": "queued"'),
        (("batches",), "light"),
        (("reconcile",), "re-enqueued"),
        (("cancel", "light"), "canceled 3 job(s)"),
        (("retry", "light", "--failed"), "0"),
        (("expand", "grid.toml"), '"id": "cell-'),
        # parquet needs the export extra (pyarrow); the base install alone exports imagefolder.
        (("export", "light", "--format", EXPORT_FORMAT, "--out", "dataset"), "exported 0 new job(s)"),
        (("gallery", "light", "--out", "gallery"), "index.html"),
    ]:
        run = light_ipab(*argv)
        assert run.returncode == 0, (argv, run.stderr)
        assert expected in run.stdout + run.stderr, (argv, run.stdout, run.stderr)


@pytest.mark.parametrize(
    "argv", [("worker",), ("generate", "--prompt", "x"), ("models", "download", "d"), ("reproduce", "job-1")]
)
def test_worker_commands_without_the_worker_extra_say_what_to_install(
    light_ipab: Callable[..., subprocess.CompletedProcess[str]], argv: tuple[str, ...]
) -> None:
    run = light_ipab(*argv)
    assert run.returncode == 2
    lines = (run.stdout + run.stderr).strip().splitlines()
    assert len(lines) == 1, lines
    assert "pip install 'ipab[worker]'" in lines[0] and "torch" in lines[0]


@pytest.mark.parametrize(
    ("module", "forbidden"),
    [
        ("scheduler/commands.py", "worker.runner"),
        ("worker/runner.py", "scheduler.submission.submit"),
        ("shared/jobs.py", "scheduler.submission.manifest"),
        ("scheduler/submit.py", "torch"),
        ("worker/tasks.py", "devkit.services"),
    ],
)
def test_a_forbidden_import_breaks_the_layer_contracts(tmp_path: Path, module: str, forbidden: str) -> None:
    lint_imports = Path(sys.executable).with_name("lint-imports")
    if not lint_imports.exists():
        pytest.skip("import-linter is not installed (the dev extra)")
    for name in ("ipab", "shared", "scheduler", "worker", "devkit"):
        shutil.copytree(REPO / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    clean = subprocess.run([str(lint_imports)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert clean.returncode == 0, clean.stdout
    # A lazy import inside a function counts as much as one at the top.
    with (tmp_path / module).open("a") as f:
        f.write(f"\n\ndef _sneaky() -> None:\n    import {forbidden}  # noqa: F401\n")
    broken = subprocess.run([str(lint_imports)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert broken.returncode != 0
    assert "BROKEN" in broken.stdout
