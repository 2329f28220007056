"""`python -m bench.gpu --smoke` (the GPU sweep on tiny configs, on the CPU) runs and reports every configuration."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from bench.common import REPO

SMOKE_BUDGET_S = 420  # about two minutes on a loaded 2-core CPU


def test_the_gpu_sweep_runs_in_smoke_mode_and_reports_each_configuration(tmp_path: Path) -> None:
    out = tmp_path / "smoke.json"
    command = [sys.executable, "-m", "bench.gpu", "--smoke", "--out", str(out)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=SMOKE_BUDGET_S)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(out.read_text())
    names = [c["name"] for c in figures["configs"]]
    assert names[0].startswith("diffusers baseline")
    assert {"ipab batch 2 float32", "ipab batch 2 float32 compiled", "ipab batch 2 bfloat16"} <= set(names)
    for config in figures["configs"]:
        assert "error" not in config and config["s_per_image"] > 0 and config["images_per_s"] > 0, config
