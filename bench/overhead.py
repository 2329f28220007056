"""System overhead: N jobs through all of ipab vs a bare diffusers loop, same rows, same model files.

- ipab: `submit_manifest` of an N-row manifest, ONE `ipab worker` process (Celery, SQL
  claim and finish, embedding cache, PNG, upload to S3 on the publisher thread).
- bare: what a user would write without ipab, in its own process: a plain
  `StableDiffusionXLPipeline.from_pretrained` + `load_ip_adapter` on the same files, each
  reference's image embedding computed once (the strict baseline: no encoder work per
  call), then one pipeline call per row, PNG saved to local disk.

Both run with the same torch thread count, measured twice in one run (THREADS below):
- torch's default (one thread per core, `OMP_NUM_THREADS` unset): what a user gets, and where
  every CPU cycle that the worker's own threads (dispatcher, lease heartbeat, publisher,
  Celery) spend is taken from the render;
- one thread (`OMP_NUM_THREADS=1`, `torch.set_num_threads(1)`): the other core plays the part
  that the CPU plays beside a GPU, so this isolates the worker's per-job path.
Steady-state seconds per job = (last finish - first finish) / (N - 1): the model load and
worker start happen before the first finish and are excluded. For ipab the finish is the
job row's `finished_at` (object stored, row succeeded); for bare, the PNG written to disk.

Run alone: `python -m bench.overhead --jobs 50 [--threads default,1] [--rounds 3]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench.common import (
    REPO,
    Services,
    bench_settings,
    job_rows,
    log,
    private_database,
    private_services,
    sessions_for,
    settings_env,
    start_worker,
    steady_state_s_per_job,
    stop_workers,
    wait_for_batch,
    write_manifest,
    write_references,
)

Threads = int | None  # torch threads; None: torch's default (one per core)
THREADS: Final[tuple[Threads, ...]] = (None, 1)
# Variables that pin the thread count; dropped for a run at torch's default.
THREAD_VARIABLES: Final = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
# Small enough for a 2-core machine, large enough that a job is real model work.
ROW_FIELDS: Final = {"width": 128, "height": 128, "steps": 8}
REFERENCES: Final = 3


# --- bare loop (runs in its own process: `python -m bench.overhead bare ...`) ------------------


def _bare_pipeline(model_set: Path) -> Any:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

    from shared.model_set import read_model_set

    pipeline_class: Any = StableDiffusionXLPipeline  # diffusers is untyped
    scheduler_class: Any = EulerDiscreteScheduler
    config = read_model_set(model_set)
    pipe = pipeline_class.from_pretrained(config.base, dtype=torch.float32)
    encoder: Any = CLIPVisionModelWithProjection.from_pretrained(config.image_encoder)
    size = int(encoder.config.image_size)
    pipe.register_modules(image_encoder=encoder, feature_extractor=CLIPImageProcessor(size=size, crop_size=size))
    adapter = config.ip_adapter
    pipe.load_ip_adapter(str(adapter.parent), subfolder="", weight_name=adapter.name, image_encoder_folder=None)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def threads_label(threads: Threads) -> str:
    """`default` or the number, as on the command line and in the figures."""
    return "default" if threads is None else str(threads)


def parse_threads(text: str) -> tuple[Threads, ...]:
    """`default,1` -> (None, 1): the thread counts to measure, in order."""
    return tuple(None if part.strip() == "default" else int(part) for part in text.split(","))


def threads_env(env: dict[str, str], threads: Threads) -> dict[str, str]:
    """`env` that gives a subprocess `threads` torch threads (without the pinning variables for the default)."""
    out = {k: v for k, v in env.items() if k not in THREAD_VARIABLES}
    return out if threads is None else {**out, "OMP_NUM_THREADS": str(threads)}


def bare_loop(model_set: Path, manifest: Path, out_dir: Path, threads: Threads) -> dict[str, Any]:
    """Render every manifest row with plain diffusers; returns the wall time at which each PNG was
    written (`finish_times`) and the torch threads it ran with."""
    import torch
    from PIL import Image

    if threads is not None:
        torch.set_num_threads(threads)
    pipe = _bare_pipeline(model_set)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    embeds: dict[str, Any] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    finished: list[float] = []
    for i, row in enumerate(rows):
        if row["reference"] not in embeds:
            with torch.no_grad():
                embeds[row["reference"]] = pipe.prepare_ip_adapter_image_embeds(
                    [Image.open(row["reference"]).convert("RGB")], None, torch.device("cpu"), 1, True
                )
        pipe.set_ip_adapter_scale(0.6)
        image = pipe(
            prompt=row["prompt"],
            ip_adapter_image_embeds=embeds[row["reference"]],
            width=row["width"],
            height=row["height"],
            num_inference_steps=row["steps"],
            guidance_scale=5.0,
            generator=torch.Generator("cpu").manual_seed(row["seed"]),
        ).images[0]
        image.save(out_dir / f"{i:05d}.png")
        finished.append(time.time())
    return {"finish_times": finished, "torch_threads": torch.get_num_threads()}


def _run_bare(svc: Services, model_set: Path, manifest: Path, env: dict[str, str], threads: Threads) -> dict[str, Any]:
    times = svc.workdir / "bare-times.json"
    argv = [sys.executable, "-m", "bench.overhead", "bare", str(model_set), str(manifest), str(svc.workdir / "bare")]
    argv += [str(times), threads_label(threads)]
    with (svc.workdir / "bare.log").open("wb") as out:
        done = subprocess.run(argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bare loop failed ({done.returncode}):\n{(svc.workdir / 'bare.log').read_text()[-3000:]}")
    result: dict[str, Any] = json.loads(times.read_text())
    return result


# --- ipab ----------------------------------------------------------------------------------------


def _run_ipab(
    svc: Services, model_set: Path, manifest: Path, url: str, threads: Threads
) -> tuple[list[float], dict[str, float]]:
    from bench.control_plane import _wait_for_consumers  # the same readiness check
    from scheduler.submission.submit import submit_manifest

    settings = bench_settings(svc, url, model_set=model_set, device="cpu", dtype="float32")
    env = threads_env(settings_env(settings), threads)
    procs = [start_worker(env, svc.workdir / "ipab-worker.log")]
    try:
        _wait_for_consumers(settings, 1, timeout_s=300)
        result = submit_manifest(settings=settings, path=manifest, batch_name="overhead", model_set_name=None)
        counts = wait_for_batch(sessions_for(settings), result.batch_id, timeout_s=900, procs=procs)
    finally:
        stop_workers(procs)
    rows = job_rows(sessions_for(settings), result.batch_id)
    if counts.get("succeeded") != len(rows) or not rows:
        raise RuntimeError(f"ipab run did not succeed: {counts}")
    n = len(rows)
    means = {
        "encode_s": sum(r.encode_s or 0 for r in rows) / n,
        "denoise_s": sum(r.denoise_s or 0 for r in rows) / n,
        "upload_s": sum(r.upload_s or 0 for r in rows) / n,
    }
    return [r.finished_at.timestamp() for r in rows if r.finished_at], means


@dataclass
class _Figures:
    """Steady-state seconds per job of every round at one thread count."""

    threads: Threads
    bare: list[float] = field(default_factory=list)
    ipab: list[float] = field(default_factory=list)
    threads_used: int | None = None  # what torch chose (the bare loop reports it)
    means: dict[str, float] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        bare_s, ipab_s = statistics.median(self.bare), statistics.median(self.ipab)
        return {
            "torch_threads": threads_label(self.threads),
            "torch_threads_used": self.threads_used,
            "bare_s_per_job": bare_s,
            "ipab_s_per_job": ipab_s,
            "bare_rounds": self.bare,
            "ipab_rounds": self.ipab,
            "ratio": ipab_s / bare_s,  # goal <= 1.05
            "ipab_row_means": self.means,
        }


def run(*, jobs: int = 50, rounds: int = 3, threads: tuple[Threads, ...] = THREADS) -> dict[str, Any]:
    """Steady-state seconds per job for ipab and for the bare loop, and their ratio, at each thread count.

    The two alternate, `rounds` times each per thread count (the order flipping every round,
    the thread counts taking turns within a round), and the medians are reported: on a
    shared 2-core machine a single pair of runs varies by 10-20 %.
    """
    from devkit.synth import write_tiny_model_set

    figures = [_Figures(threads=t) for t in threads]
    with private_services() as svc:
        write_tiny_model_set(svc.workdir / "models")
        model_set = svc.workdir / "models" / "model-set.toml"
        refs = write_references(svc.workdir / "refs", REFERENCES)
        manifest = write_manifest(svc.workdir / "overhead.jsonl", refs, rows=jobs, fields=ROW_FIELDS)
        base_env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

        def run_bare(f: _Figures) -> None:
            done = _run_bare(svc, model_set, manifest, threads_env(base_env, f.threads), f.threads)
            f.bare.append(steady_state_s_per_job(done["finish_times"]))
            f.threads_used = int(done["torch_threads"])
            log(f"overhead: bare, {threads_label(f.threads)} threads: {f.bare[-1]:.3f} s/job")

        def run_ipab(f: _Figures) -> None:
            with private_database("sqlite", svc.workdir) as url:
                finished, means_now = _run_ipab(svc, model_set, manifest, url, f.threads)
            f.ipab.append(steady_state_s_per_job(finished))
            f.means.update(means_now)
            log(f"overhead: ipab, {threads_label(f.threads)} threads: {f.ipab[-1]:.3f} s/job")

        for i in range(rounds):
            log(f"overhead: round {i + 1}/{rounds}, {jobs} jobs each")
            for f in figures:
                for step in (run_bare, run_ipab) if i % 2 == 0 else (run_ipab, run_bare):
                    step(f)
    by_threads = [f.summary() for f in figures]
    return {
        "jobs": jobs,
        "rounds": rounds,
        "row": ROW_FIELDS,
        "by_threads": by_threads,
        "ratio": max(r["ratio"] for r in by_threads),  # the worst thread count; goal <= 1.05
    }


def main() -> None:
    """`python -m bench.overhead [--jobs N] [--threads default,1] [--rounds R]`, or the bare loop alone:
    `bare MODEL_SET MANIFEST OUT_DIR TIMES_JSON THREADS`."""
    if len(sys.argv) > 1 and sys.argv[1] == "bare":
        model_set, manifest, out_dir, times = (Path(a) for a in sys.argv[2:6])
        (threads,) = parse_threads(sys.argv[6])
        times.write_text(json.dumps(bare_loop(model_set, manifest, out_dir, threads)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--threads", type=parse_threads, default=THREADS, help="torch thread counts to measure (default: default,1)"
    )
    args = parser.parse_args()
    print(json.dumps(run(jobs=args.jobs, rounds=args.rounds, threads=args.threads), indent=2))


if __name__ == "__main__":
    main()
