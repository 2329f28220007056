"""System overhead: N jobs through all of ipab vs a bare diffusers loop, same rows, same model files.

- ipab: `submit_manifest` of an N-row manifest, ONE `ipab worker` process (Celery, SQL
  claim and finish, embedding cache, PNG, upload to S3 on the publisher thread).
- bare: what a user would write without ipab, in its own process: a plain
  `StableDiffusionXLPipeline.from_pretrained` + `load_ip_adapter` on the same files, each
  reference's image embedding computed once (the strict baseline: no encoder work per
  call), then one pipeline call per row, PNG saved to local disk.

Both run with the same torch thread count (`OMP_NUM_THREADS` and `torch.set_num_threads`,
THREADS below: one, so the other core plays the part that the CPU plays beside a GPU).
Steady-state seconds per job = (last finish - first finish) / (N - 1): the model load and
worker start happen before the first finish and are excluded. For ipab the finish is the
job row's `finished_at` (object stored, row succeeded); for bare, the PNG written to disk.

Run alone: `python -m bench.overhead --jobs 50`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
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

THREADS: Final = 1
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


def bare_loop(model_set: Path, manifest: Path, out_dir: Path) -> list[float]:
    """Render every manifest row with plain diffusers; returns the wall time at which each PNG was written."""
    import torch
    from PIL import Image

    torch.set_num_threads(THREADS)
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
    return finished


def _run_bare(svc: Services, model_set: Path, manifest: Path, env: dict[str, str]) -> list[float]:
    times = svc.workdir / "bare-times.json"
    argv = [sys.executable, "-m", "bench.overhead", "bare", str(model_set), str(manifest), str(svc.workdir / "bare")]
    with (svc.workdir / "bare.log").open("wb") as out:
        done = subprocess.run([*argv, str(times)], env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"bare loop failed ({done.returncode}):\n{(svc.workdir / 'bare.log').read_text()[-3000:]}")
    finish_times: list[float] = json.loads(times.read_text())
    return finish_times


# --- ipab ----------------------------------------------------------------------------------------


def _run_ipab(svc: Services, model_set: Path, manifest: Path, url: str) -> tuple[list[float], dict[str, float]]:
    from bench.control_plane import _wait_for_consumers  # the same readiness check
    from scheduler.submission.submit import submit_manifest

    settings = bench_settings(svc, url, model_set=model_set, device="cpu", dtype="float32")
    env = settings_env(settings, OMP_NUM_THREADS=str(THREADS))
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


def run(*, jobs: int = 50, rounds: int = 3) -> dict[str, Any]:
    """Steady-state seconds per job for ipab and for the bare loop, and their ratio.

    The two alternate, `rounds` times each (the order flipping every round), and the medians
    are reported: on a shared 2-core machine a single pair of runs varies by 10-20 %.
    """
    from devkit.synth import write_tiny_model_set

    bare: list[float] = []
    ipab: list[float] = []
    means: dict[str, float] = {}
    with private_services() as svc:
        write_tiny_model_set(svc.workdir / "models")
        model_set = svc.workdir / "models" / "model-set.toml"
        refs = write_references(svc.workdir / "refs", REFERENCES)
        manifest = write_manifest(svc.workdir / "overhead.jsonl", refs, rows=jobs, fields=ROW_FIELDS)
        env = {**os.environ, "OMP_NUM_THREADS": str(THREADS), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}

        def run_bare() -> None:
            bare.append(steady_state_s_per_job(_run_bare(svc, model_set, manifest, env)))
            log(f"overhead: bare {bare[-1]:.3f} s/job")

        def run_ipab() -> None:
            with private_database("sqlite", svc.workdir) as url:
                finished, means_now = _run_ipab(svc, model_set, manifest, url)
            ipab.append(steady_state_s_per_job(finished))
            means.update(means_now)
            log(f"overhead: ipab {ipab[-1]:.3f} s/job")

        for i in range(rounds):
            log(f"overhead: round {i + 1}/{rounds}, {jobs} jobs each")
            for step in (run_bare, run_ipab) if i % 2 == 0 else (run_ipab, run_bare):
                step()
    bare_s, ipab_s = statistics.median(bare), statistics.median(ipab)
    return {
        "jobs": jobs,
        "rounds": rounds,
        "torch_threads": THREADS,
        "row": ROW_FIELDS,
        "bare_s_per_job": bare_s,
        "ipab_s_per_job": ipab_s,
        "bare_rounds": bare,
        "ipab_rounds": ipab,
        "ratio": ipab_s / bare_s,  # goal <= 1.05
        "ipab_row_means": means,
    }


def main() -> None:
    """`python -m bench.overhead [--jobs N]`, or the bare loop alone: `bare MODEL_SET MANIFEST OUT_DIR TIMES_JSON`."""
    if len(sys.argv) > 1 and sys.argv[1] == "bare":
        model_set, manifest, out_dir, times = (Path(a) for a in sys.argv[2:6])
        times.write_text(json.dumps(bare_loop(model_set, manifest, out_dir)))
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=50)
    print(json.dumps(run(jobs=parser.parse_args().jobs), indent=2))


if __name__ == "__main__":
    main()
