"""Fast model sets on the tiny model (CPU): images/s of the fast set against the default set, same rows.

The same rows (prompt, seed, reference, size) run on two tiny model sets through the worker's
pipeline path (`Renderer.generate_batch` with cached embeddings), each with its own `[defaults]`
as a submission gives them: the default set at ipab's defaults (Euler, 30 steps, guidance 5: two
UNet passes a step) and `model-set-fast.toml` (a LoRA fused at load, TCD, 4 steps, guidance 0: one
pass a step). What the ratio shows is the step and pass count; the tiny model's per-call overhead
(text encoders, VAE) is a larger share than on SDXL, so a GPU at 1024x1024 (`bench/gpu.py`) gains
more. Both sets are measured in the same run, alternating, so machine load hits both alike.

    python -m bench.fast_sets [--rows 8] [--size 64]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Final

SETS: Final = ("default", "fast")
BATCH: Final = 4
GOAL_RATIO: Final = 5.0  # the goal for 4 against 30 steps


def _renderers(folder: Path) -> dict[str, Any]:
    from devkit.synth import write_tiny_model_set
    from shared.model_set import read_model_set
    from worker.pipeline import Renderer

    paths = write_tiny_model_set(folder, seed=0)
    return {key: Renderer.load(read_model_set(paths[key]), device="cpu", dtype="float32") for key in SETS}


def _items(renderer: Any, *, rows: int, size_px: int) -> list[tuple[Any, list[Any]]]:
    """The rows as jobs of this set: each row's own fields, the set's defaults for the rest."""
    from shared.spec import parse_params

    embeds = renderer.encode([_picture(i) for i in range(2)])
    items = []
    for i in range(rows):
        row = {"prompt": f"a photo, variant {i}", "seed": i, "width": size_px, "height": size_px}
        items.append((parse_params({**renderer.config.rules.defaults, **row}), [embeds[i % 2]]))
    return items


def _seconds(renderer: Any, items: list[tuple[Any, list[Any]]]) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(items), BATCH):
        renderer.generate_batch(items[start : start + BATCH], output="np")
    return time.perf_counter() - t0


def _picture(seed: int) -> Any:
    import numpy as np
    from PIL import Image

    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (48, 48, 3), dtype=np.uint8))


def run(*, rows: int = 8, size_px: int = 64, rounds: int = 2) -> dict[str, Any]:
    """images/s of each set on the same rows (best of `rounds`, alternating), and fast over default."""
    with tempfile.TemporaryDirectory() as folder:
        renderers = _renderers(Path(folder))
        items = {key: _items(r, rows=rows, size_px=size_px) for key, r in renderers.items()}
        for key, renderer in renderers.items():  # warm-up: first calls allocate
            renderer.generate_batch(items[key][:BATCH], output="np")
        best = dict.fromkeys(SETS, float("inf"))
        for _ in range(rounds):
            for key in SETS:
                best[key] = min(best[key], _seconds(renderers[key], items[key]))
        settings = {
            key: {"scheduler": p.scheduler, "steps": p.steps, "guidance_scale": p.guidance_scale}
            for key, p in ((k, items[k][0][0]) for k in SETS)
        }
        passes = {key: renderers[key].uses_cfg(items[key][0][0]) + 1 for key in SETS}
    rates = {key: rows / best[key] for key in SETS}
    return {
        "rows": rows,
        "size_px": size_px,
        "batch": BATCH,
        "settings": settings,
        "unet_passes_per_step": passes,
        "default_images_per_s": rates["default"],
        "fast_images_per_s": rates["fast"],
        "fast_over_default": rates["fast"] / rates["default"],
        "goal": GOAL_RATIO,
    }


def to_markdown(figures: dict[str, Any]) -> str:
    """The section's table for BENCHMARKS.md."""
    s, p = figures["settings"], figures["unet_passes_per_step"]
    rows = "\n".join(
        f"| {key} | {s[key]['scheduler']}, {s[key]['steps']} steps, guidance {s[key]['guidance_scale']:g} "
        f"| {p[key]} | {figures[f'{key}_images_per_s']:.2f} |"
        for key in SETS
    )
    ratio = figures["fast_over_default"]
    verdict = "met" if ratio >= figures["goal"] else "NOT met"
    return (
        f"Tiny model, CPU, {figures['size_px']}x{figures['size_px']}, the same {figures['rows']} rows on each set "
        f"(batch {figures['batch']}), each set's `[defaults]` filling what the rows leave out:\n\n"
        "| set | scheduler, steps, guidance | UNet passes / step | images/s |\n| --- | --- | --- | --- |\n"
        f"{rows}\n\n"
        f"Fast / default: **{ratio:.2f}x** images/s (goal >= {figures['goal']:g}x for 4 vs 30 steps: {verdict}; "
        "same run). The fast set's LoRA is fused at load, so a step costs what a step of the base costs."
    )


def main() -> None:
    """Command line: print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--size", type=int, default=64)
    args = parser.parse_args()
    print(json.dumps(run(rows=args.rows, size_px=args.size), indent=2))


if __name__ == "__main__":
    main()
