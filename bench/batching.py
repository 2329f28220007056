"""Micro-batching on the tiny model (CPU): jobs/s at batch 1 and batch 4, measured in the same run.

The pipeline path the worker takes (`Renderer.generate_batch` with cached embeddings), on the
tiny random-weight model set at 64x64, 4 steps. It shows what batching does to throughput
where the per-call overhead is large against the compute; a GPU at 1024x1024 is measured by
`bench/gpu.py`.

    python -m bench.batching [--jobs 16]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Final

BATCH_SIZES: Final = (1, 4)
SIZE_PX: Final = 64
STEPS: Final = 4


def _renderer(folder: Path) -> Any:
    from devkit.synth import write_tiny_model_set
    from shared.model_set import read_model_set
    from worker.pipeline import Renderer

    sets = write_tiny_model_set(folder, seed=0)
    return Renderer.load(read_model_set(sets["default"]), device="cpu", dtype="float32")


def _jobs_per_s(renderer: Any, *, jobs: int, batch: int) -> float:
    from shared.spec import parse_params

    embeds = renderer.encode([_picture(i) for i in range(2)])
    params = [
        parse_params({"prompt": f"job {i}", "seed": i, "width": SIZE_PX, "height": SIZE_PX, "steps": STEPS})
        for i in range(jobs)
    ]
    items = [(p, [embeds[i % 2]]) for i, p in enumerate(params)]
    renderer.generate_batch(items[:batch])  # warm-up
    t0 = time.perf_counter()
    for start in range(0, jobs, batch):
        renderer.generate_batch(items[start : start + batch])
    return jobs / (time.perf_counter() - t0)


def _picture(seed: int) -> Any:
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8))


def run(*, jobs: int = 16) -> dict[str, Any]:
    """jobs/s at each batch size, and batch 4's ratio to batch 1."""
    with tempfile.TemporaryDirectory() as folder:
        renderer = _renderer(Path(folder))
        rates = {f"batch_{b}_jobs_per_s": _jobs_per_s(renderer, jobs=jobs, batch=b) for b in BATCH_SIZES}
    return {
        "jobs": jobs,
        "size_px": SIZE_PX,
        "steps": STEPS,
        **rates,
        "batch_4_over_batch_1": rates["batch_4_jobs_per_s"] / rates["batch_1_jobs_per_s"],
    }


def to_markdown(figures: dict[str, Any]) -> str:
    """A short table for BENCHMARKS.md."""
    return (
        f"Tiny model, CPU, {figures['size_px']}x{figures['size_px']}, {figures['steps']} steps, "
        f"{figures['jobs']} jobs:\n\n| batch | jobs/s |\n| --- | --- |\n"
        f"| 1 | {figures['batch_1_jobs_per_s']:.2f} |\n| 4 | {figures['batch_4_jobs_per_s']:.2f} |\n\n"
        f"Batch 4 / batch 1: {figures['batch_4_over_batch_1']:.2f}x (same run)."
    )


def main() -> None:
    """Command line: print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=16)
    print(json.dumps(run(jobs=parser.parse_args().jobs), indent=2))


if __name__ == "__main__":
    main()
