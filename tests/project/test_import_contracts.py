"""`make lint`'s import contracts hold on the code, and each one catches the import it forbids.

The contracts run against a copy of the packages with one offending import added per contract:
a contract that stays KEPT there would guard nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")
PACKAGES = ("ipab", "shared", "scheduler", "worker", "devkit")
# One offending import per contract, by contract name (a prefix of it), in the module that must not have it.
BREAKS = {
    "Layers: the entry point": ("shared/keys.py", "import ipab.cli"),
    "The control plane and shared never import the GPU stack": ("scheduler/tenants.py", "import torch"),
    "Runtime packages never import the development package": ("worker/weights.py", "import skimage"),
    "Control plane: faces": ("scheduler/batches/counts.py", "import scheduler.cli.common"),
    "HTTP frameworks only in the API": ("scheduler/webhooks/signing.py", "import starlette"),
    "The publisher does not depend on the runner": ("worker/publisher.py", "import worker.runner"),
}


def _contract_names() -> list[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    return [c["name"] for c in config["tool"]["importlinter"]["contracts"]]


def _lint_imports(root: Path) -> str:
    # Only the copy may be found: not the editable install of the checkout, nor the checkout itself.
    env = {**os.environ, "PYTHONPATH": str(root), "PYTHONSAFEPATH": "1"}
    code = (
        "import sys; sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in type(f).__name__.lower()]; "
        f"sys.path.insert(0, {str(root)!r}); "
        "from importlinter.cli import lint_imports_command; lint_imports_command()"
    )
    run = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    return " ".join((run.stdout + run.stderr).split())  # long contract names wrap at the terminal's width


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    for name in PACKAGES:
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root / "pyproject.toml")
    return root


def test_every_contract_has_a_breaking_import_here() -> None:
    names = _contract_names()
    assert len(names) == len(BREAKS)
    for prefix in BREAKS:
        assert sum(name.startswith(prefix) for name in names) == 1, prefix


def test_each_contract_is_kept_and_breaks_when_its_import_is_added(tmp_path: Path) -> None:
    root = _copy(tmp_path)
    kept = _lint_imports(root)
    for name in _contract_names():
        assert f"{name} KEPT" in kept, (name, kept[-3000:])

    for module, line in BREAKS.values():
        path = root / module
        path.write_text(path.read_text() + f"\n{line}  # noqa\n")
    broken = _lint_imports(root)
    for name in _contract_names():
        assert f"{name} BROKEN" in broken, (name, broken[-3000:])
