"""`python -m bench.gpu --smoke` (the GPU benchmark on tiny configs, on the CPU) runs and reports every
configuration, the worker path (the same weights through submit, SQL, one real worker and S3) and the
fast set (a LoRA fused in by ipab's loader, TCD, 4 steps, no guidance)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from bench.common import REPO
from bench.report import gpu_section

# Two to three minutes on a loaded 2-core CPU, the worker path and the fast set included; about 7 with
# a load average above 10 (measured: 407 s, of which the fast set about 10).
SMOKE_BUDGET_S = 480


def test_the_gpu_sweep_runs_in_smoke_mode_and_reports_each_configuration_and_the_worker_path(tmp_path: Path) -> None:
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
    _assert_the_worker_path_rendered_every_job(figures["worker_path"])
    fast = figures["fast_set"]
    assert "error" not in fast and "skipped" not in fast, json.dumps(fast, indent=1)
    assert (fast["scheduler"], fast["steps"], fast["guidance_scale"], fast["batch"]) == ("tcd", 4, 0.0, 2), fast
    assert fast["fuse_s"] >= 0 and fast["images_per_s"] > 0 and fast["fast_over_default"] > 0, fast
    section = "\n".join(gpu_section(figures))  # as BENCHMARKS.md shows it
    assert "| ipab batch 2 float32 compiled |" in section and "Worker path: 8 jobs through `ipab worker`" in section
    assert "Fast set: a rank-4 LoRA fused in at load" in section


def _assert_the_worker_path_rendered_every_job(worker: dict[str, Any]) -> None:
    assert "error" not in worker and "skipped" not in worker, json.dumps(worker, indent=1)
    assert (worker["jobs"], worker["batch_size"], worker["pipeline"]) == (8, 2, "ipab batch 2 float32"), worker
    assert worker["succeeded"] == worker["pngs_in_s3"] == worker["jobs"], worker
    assert worker["images_per_s"] > 0 and worker["worker_over_pipeline"] > 0, worker
    jobs_by_size = {int(size): count for size, count in worker["render_batch_sizes"].items()}
    assert sum(jobs_by_size.values()) == worker["jobs"], worker
    # Every call held 1 or 2 compatible jobs, and at least one held 2: the worker batched.
    assert set(jobs_by_size) <= {1, 2} and max(jobs_by_size) == 2, worker
