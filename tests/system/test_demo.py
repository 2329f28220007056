"""`python -m devkit demo` (what `make demo` runs), on the test's Redis, S3 and SQLite: its batch on
the default set and its jobs on the fast set (a LoRA fused at load, TCD, 4 steps, no guidance), each
set served by its own real `ipab worker`."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shared.settings import Settings
from tests.system.conftest import REPO

LORA = "loras/tiny-tcd-lora.safetensors"


def rows_of(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_demo_renders_its_batch_and_fast_set_jobs_whose_provenance_names_the_lora(
    settings: Settings, settings_env: Callable[[Settings], dict[str, str]], tmp_path: Path, tiny_model_set: Path
) -> None:
    workdir = tmp_path / "demo"
    workdir.mkdir()
    (workdir / "models").symlink_to(tiny_model_set.parent)  # the session's tiny sets: the demo writes none
    env = {**os.environ, **settings_env(settings), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "devkit", "demo", "--dir", str(workdir), "--jobs-per-reference", "1"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert [row["status"] for row in rows_of(workdir / "results.jsonl")] == ["succeeded"] * 3
    fast = rows_of(workdir / "results-fast.jsonl")
    lora_sha256 = hashlib.sha256((tiny_model_set.parent / LORA).read_bytes()).hexdigest()
    for row in fast:
        assert row["status"] == "succeeded", row
        assert (row["scheduler"], row["steps"], row["guidance_scale"]) == ("tcd", 4, 0.0)  # the set's [defaults]
        assert row["provenance"]["loras"] == [{"name": "tiny-tcd-lora", "sha256": lora_sha256, "scale": 1.0}]
    assert len(fast) == 3 and "fast set:  3/3 succeeded" in done.stdout
    assert done.stdout.count('"name": "tiny-tcd-lora"') == 3, done.stdout
