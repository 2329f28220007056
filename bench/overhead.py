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
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any, Final

from bench.common import (
    REPO,
    Services,
    bench_settings,
    job_rows,
    log,
    log_tail,
    private_database,
    private_services,
    sessions_for,
    settings_env,
    start_worker,
    steady_state_s_per_job,
    stop_workers,
    wait_for_batch,
    with_bytecode,
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
WHOLE_JOBS: Final = 40  # issue 22's batch for the whole-system ratio
WARM_JOBS: Final = 2  # the warm-up batch that loads a worker's model before the timed one
CLI_TIMEOUT_S: Final = 900  # one CLI step; a worker that dies leaves `ipab status --watch` waiting


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
    """Render every manifest row with plain diffusers; returns the wall time at which the loop began
    (`loop_started`, the model loaded) and at which each PNG was written (`finish_times`), and the
    torch threads it ran with."""
    import torch
    from PIL import Image

    if threads is not None:
        torch.set_num_threads(threads)
    pipe = _bare_pipeline(model_set)
    rows = [json.loads(line) for line in manifest.read_text().splitlines()]
    embeds: dict[str, Any] = {}
    out_dir.mkdir(parents=True, exist_ok=True)
    finished: list[float] = []
    loop_started = time.time()
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
    return {"loop_started": loop_started, "finish_times": finished, "torch_threads": torch.get_num_threads()}


def _run_bare(svc: Services, model_set: Path, manifest: Path, env: dict[str, str], threads: Threads) -> dict[str, Any]:
    """The bare loop's figures (see `bare_loop`) and `process_s`, its process's wall time from start to exit."""
    times = svc.workdir / "bare-times.json"
    argv = [sys.executable, "-m", "bench.overhead", "bare", str(model_set), str(manifest), str(svc.workdir / "bare")]
    argv += [str(times), threads_label(threads)]
    started_s = time.perf_counter()
    with (svc.workdir / "bare.log").open("wb") as out:
        done = subprocess.run(argv, env=env, cwd=REPO, stdout=out, stderr=subprocess.STDOUT, check=False)
    process_s = time.perf_counter() - started_s
    if done.returncode != 0:
        raise RuntimeError(f"bare loop failed ({done.returncode}):\n{(svc.workdir / 'bare.log').read_text()[-3000:]}")
    result: dict[str, Any] = json.loads(times.read_text())
    return {**result, "process_s": process_s}


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


# --- whole system: what a user waits for (issue 22) --------------------------------------------

CLI_STEPS: Final = ("submit_s", "watch_s", "results_s")
# Where the watch's seconds go: `_cli_steps`'s job-row times against the steps' ends.
WATCH_PARTS: Final = ("first_start_after_submit_s", "worker_span_s", "watch_end_after_last_finish_s")


def _ipab_cli(env: dict[str, str], out_stem: Path, *args: str) -> float:
    """Wall seconds of `ipab ARGS`, a fresh process as a user at a shell starts it; its stdout goes
    to OUT_STEM.out and its stderr to OUT_STEM.err. Raises if it fails or runs past CLI_TIMEOUT_S."""
    argv = [sys.executable, "-m", "ipab.cli", *args]
    err_path = out_stem.with_suffix(".err")
    with out_stem.with_suffix(".out").open("wb") as out, err_path.open("wb") as err:
        started_s = time.perf_counter()
        done = subprocess.run(argv, env=env, cwd=REPO, stdout=out, stderr=err, check=False, timeout=CLI_TIMEOUT_S)
        elapsed_s = time.perf_counter() - started_s
    if done.returncode != 0:
        raise RuntimeError(f"`ipab {' '.join(args)}` exited {done.returncode}:\n{log_tail(err_path)}")
    return elapsed_s


def _succeeded_results(path: Path, *, rows: int) -> list[dict[str, Any]]:
    """The lines `ipab results` printed; raises unless there is one per row and every job succeeded."""
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    statuses = Counter(line["status"] for line in lines)
    if len(lines) != rows or statuses != Counter(succeeded=rows):
        raise RuntimeError(f"`ipab results` printed {len(lines)} lines for {rows} rows, statuses {dict(statuses)}")
    return lines


def _job_span(lines: list[dict[str, Any]]) -> tuple[float, float]:
    """(first `started_at`, last `finished_at`) of the jobs in `ipab results` lines, as Unix seconds."""

    def unix_s(line: dict[str, Any], name: str) -> float:
        return datetime.fromisoformat(line["timings"][name]).timestamp()

    return min(unix_s(line, "started_at") for line in lines), max(unix_s(line, "finished_at") for line in lines)


def _results_and_span(
    env: dict[str, str], folder: Path, manifest: Path, batch: str, started_s: float
) -> tuple[float, float, float, float]:
    """`ipab results` last: its wall seconds, the flow's from `started_s` (perf_counter) to its end, and
    the first job's start and the last one's finish (Unix seconds) from the lines it printed."""
    results_s = _ipab_cli(env, folder / f"{batch}-results", "results", batch)
    ipab_s = time.perf_counter() - started_s
    rows = len(manifest.read_text().splitlines())
    first_start, last_finish = _job_span(_succeeded_results(folder / f"{batch}-results.out", rows=rows))
    return results_s, ipab_s, first_start, last_finish


def _cli_steps(env: dict[str, str], folder: Path, manifest: Path, batch: str) -> dict[str, float]:
    """`ipab submit`, `ipab status --watch` and `ipab results`, one after another as a user runs them:
    each step's wall seconds, `ipab_s` from just before the submit to the end of the results, and
    where the watch's seconds went (the job rows' times against the steps' ends; one clock)."""
    started_s = time.perf_counter()
    submit_s = _ipab_cli(env, folder / f"{batch}-submit", "submit", str(manifest), "--batch", batch)
    submitted_at = time.time()
    watch_s = _ipab_cli(env, folder / f"{batch}-watch", "status", batch, "--watch")
    watched_at = time.time()
    results_s, ipab_s, first_start, last_finish = _results_and_span(env, folder, manifest, batch, started_s)
    return {
        "submit_s": submit_s,
        "watch_s": watch_s,
        "results_s": results_s,
        "ipab_s": ipab_s,
        "first_start_after_submit_s": first_start - submitted_at,  # dispatcher and worker pick-up
        "worker_span_s": last_finish - first_start,  # first job started to last job finished
        "watch_end_after_last_finish_s": watched_at - last_finish,  # the watch noticing the end, exiting
    }


TWO_STEPS: Final = ("submit_watch_s", "results_s")
TWO_PARTS: Final = ("first_start_after_start_s", "worker_span_s", "watch_end_after_last_finish_s")


def _cli_two_steps(env: dict[str, str], folder: Path, manifest: Path, batch: str) -> dict[str, float]:
    """`ipab submit --watch` (submits, then waits in the same process until every job is final) and
    `ipab results`: the two commands of `_cli_steps`'s flow once the watch is the submit's own."""
    started_at, started_s = time.time(), time.perf_counter()
    submit_watch_s = _ipab_cli(env, folder / f"{batch}-submit", "submit", str(manifest), "--batch", batch, "--watch")
    watched_at = time.time()
    results_s, ipab_s, first_start, last_finish = _results_and_span(env, folder, manifest, batch, started_s)
    return {
        "submit_watch_s": submit_watch_s,
        "results_s": results_s,
        "ipab_s": ipab_s,
        "first_start_after_start_s": first_start - started_at,  # submit's start-up, dispatcher, worker pick-up
        "worker_span_s": last_finish - first_start,
        "watch_end_after_last_finish_s": watched_at - last_finish,
    }


@dataclass(frozen=True)
class _Setup:
    """What every measurement of one run shares: the private services, the model set, the manifests."""

    svc: Services
    model_set: Path
    manifest: Path  # the steady state's rows
    whole_manifest: Path  # the whole system's rows
    warm_manifest: Path  # the warm-up batch's rows, on a reference the timed batches do not use
    base_env: dict[str, str]


def _prepare(svc: Services, *, jobs: int, whole_jobs: int) -> _Setup:
    """The tiny model set, the references and the three manifests, in the services' folder."""
    from devkit.synth import write_tiny_model_set

    write_tiny_model_set(svc.workdir / "models")
    refs = write_references(svc.workdir / "refs", REFERENCES + 1)
    timed, warm = refs[:REFERENCES], refs[REFERENCES:]
    return _Setup(
        svc=svc,
        model_set=svc.workdir / "models" / "model-set.toml",
        manifest=write_manifest(svc.workdir / "overhead.jsonl", timed, rows=jobs, fields=ROW_FIELDS),
        whole_manifest=write_manifest(svc.workdir / "whole.jsonl", timed, rows=whole_jobs, fields=ROW_FIELDS),
        warm_manifest=write_manifest(svc.workdir / "warm-up.jsonl", warm, rows=WARM_JOBS, fields=ROW_FIELDS),
        # Bytecode read and written, as an installed package has it (the first round compiles).
        base_env=with_bytecode(
            {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}, svc.workdir / "pycache"
        ),
    )


def _run_ipab_whole(
    setup: _Setup, url: str, threads: Threads, *, two_first: bool
) -> tuple[dict[str, float], dict[str, float]]:
    """`_cli_steps` and `_cli_two_steps` on the whole manifest (two batches; `two_first`: in that
    order), with ONE `ipab worker` on `url` already running and its model loaded: a warm-up batch
    goes through the same steps first, as a standing service has it."""
    from bench.control_plane import _wait_for_consumers  # the same readiness check

    settings = bench_settings(setup.svc, url, model_set=setup.model_set, device="cpu", dtype="float32")
    env = threads_env(settings_env(settings), threads)  # IPAB_MODEL_SET included: `submit` needs no --model-set
    env = with_bytecode(env, setup.svc.workdir / "pycache")
    folder = setup.svc.workdir / "whole"
    folder.mkdir(exist_ok=True)
    procs = [start_worker(env, setup.svc.workdir / "ipab-whole-worker.log")]
    try:
        _wait_for_consumers(settings, 1, timeout_s=300)
        _cli_steps(env, folder, setup.warm_manifest, "warm-up")
        if two_first:
            two = _cli_two_steps(env, folder, setup.whole_manifest, "whole-two")
            return _cli_steps(env, folder, setup.whole_manifest, "whole"), two
        three = _cli_steps(env, folder, setup.whole_manifest, "whole")
        return three, _cli_two_steps(env, folder, setup.whole_manifest, "whole-two")
    finally:
        stop_workers(procs)


@dataclass
class _Whole:
    """Whole-system seconds of every round at one thread count."""

    threads: Threads
    bare_loop: list[float] = field(default_factory=list)  # first pipeline call to last PNG
    bare_process: list[float] = field(default_factory=list)  # interpreter start to exit
    ipab: list[dict[str, float]] = field(default_factory=list)  # `_cli_steps`
    two: list[dict[str, float]] = field(default_factory=list)  # `_cli_two_steps`
    threads_used: int | None = None

    def summary(self) -> dict[str, Any]:
        loop_s, process_s = statistics.median(self.bare_loop), statistics.median(self.bare_process)
        ipab_s = statistics.median(r["ipab_s"] for r in self.ipab)
        return {
            "torch_threads": threads_label(self.threads),
            "torch_threads_used": self.threads_used,
            "bare_loop_s": loop_s,
            "bare_process_s": process_s,
            "ipab_s": ipab_s,
            **{f"ipab_{step}": statistics.median(r[step] for r in self.ipab) for step in CLI_STEPS},
            "ipab_watch_parts": {part: statistics.median(r[part] for r in self.ipab) for part in WATCH_PARTS},
            "ratio": ipab_s / loop_s,  # goal <= 1.1
            "ratio_process": ipab_s / process_s,
            "rounds": {"bare_loop_s": self.bare_loop, "bare_process_s": self.bare_process, "ipab": self.ipab},
            "two_commands": self._two_summary(loop_s, process_s),
        }

    def _two_summary(self, loop_s: float, process_s: float) -> dict[str, Any]:
        """The same figures for `ipab submit --watch` + `ipab results`."""
        if not self.two:
            return {}
        ipab_s = statistics.median(r["ipab_s"] for r in self.two)
        return {
            "ipab_s": ipab_s,
            **{f"ipab_{step}": statistics.median(r[step] for r in self.two) for step in TWO_STEPS},
            "parts": {part: statistics.median(r[part] for r in self.two) for part in TWO_PARTS},
            "ratio": ipab_s / loop_s,  # goal <= 1.1
            "ratio_process": ipab_s / process_s,
            "rounds": [r["ipab_s"] for r in self.two],
        }


# --- the rounds ----------------------------------------------------------------------------------

Step = Callable[[], None]


def _steady_bare(setup: _Setup, f: _Figures) -> None:
    done = _run_bare(setup.svc, setup.model_set, setup.manifest, threads_env(setup.base_env, f.threads), f.threads)
    f.bare.append(steady_state_s_per_job(done["finish_times"]))
    f.threads_used = int(done["torch_threads"])
    log(f"overhead: bare, {threads_label(f.threads)} threads: {f.bare[-1]:.3f} s/job")


def _steady_ipab(setup: _Setup, f: _Figures) -> None:
    with private_database("sqlite", setup.svc.workdir) as url:
        finished, means_now = _run_ipab(setup.svc, setup.model_set, setup.manifest, url, f.threads)
    f.ipab.append(steady_state_s_per_job(finished))
    f.means.update(means_now)
    log(f"overhead: ipab, {threads_label(f.threads)} threads: {f.ipab[-1]:.3f} s/job")


def _whole_bare(setup: _Setup, w: _Whole) -> None:
    env = threads_env(setup.base_env, w.threads)
    done = _run_bare(setup.svc, setup.model_set, setup.whole_manifest, env, w.threads)
    w.bare_loop.append(max(done["finish_times"]) - done["loop_started"])
    w.bare_process.append(done["process_s"])
    w.threads_used = int(done["torch_threads"])
    figures = f"loop {w.bare_loop[-1]:.2f} s, process {w.bare_process[-1]:.2f} s"
    log(f"overhead: whole system, bare, {threads_label(w.threads)} threads: {figures}")


def _whole_ipab(setup: _Setup, w: _Whole) -> None:
    with private_database("sqlite", setup.svc.workdir) as url:
        # Which flow's batch goes first alternates by round: the second finds the worker's caches warmer.
        steps, two = _run_ipab_whole(setup, url, w.threads, two_first=len(w.ipab) % 2 == 1)
    w.ipab.append(steps)
    w.two.append(two)
    parts = ", ".join(f"{step.removesuffix('_s')} {steps[step]:.2f} s" for step in CLI_STEPS)
    log(f"overhead: whole system, ipab, {threads_label(w.threads)} threads: {steps['ipab_s']:.2f} s ({parts})")
    parts = ", ".join(f"{step.removesuffix('_s')} {two[step]:.2f} s" for step in TWO_STEPS)
    label = threads_label(w.threads)
    log(f"overhead: whole system, ipab submit --watch, {label} threads: {two['ipab_s']:.2f} s ({parts})")


def _pairs(setup: _Setup, figures: list[_Figures], wholes: list[_Whole]) -> list[tuple[Step, Step]]:
    """(bare, ipab) of each measurement, thread count by thread count; no whole-system pair without `wholes`."""
    pairs: list[tuple[Step, Step]] = []
    for i, f in enumerate(figures):
        pairs.append((partial(_steady_bare, setup, f), partial(_steady_ipab, setup, f)))
        if wholes:
            pairs.append((partial(_whole_bare, setup, wholes[i]), partial(_whole_ipab, setup, wholes[i])))
    return pairs


def run(
    *, jobs: int = 50, rounds: int = 3, threads: tuple[Threads, ...] = THREADS, whole_jobs: int = WHOLE_JOBS
) -> dict[str, Any]:
    """Steady-state seconds per job for ipab and for the bare loop, and their ratio, at each thread count;
    with `whole_jobs`, the whole-system seconds of a batch of that many rows (module docstring) too.

    Bare and ipab alternate, `rounds` times each per thread count (the order flipping every round,
    the thread counts taking turns within a round), and the medians are reported: on a
    shared 2-core machine a single pair of runs varies by 10-20 %.
    """
    figures = [_Figures(threads=t) for t in threads]
    wholes = [_Whole(threads=t) for t in threads] if whole_jobs else []
    with private_services() as svc:
        pairs = _pairs(_prepare(svc, jobs=jobs, whole_jobs=whole_jobs), figures, wholes)
        for i in range(rounds):
            log(f"overhead: round {i + 1}/{rounds}, {jobs} jobs each, whole system {whole_jobs} jobs each")
            for bare, ipab in pairs:
                for step in (bare, ipab) if i % 2 == 0 else (ipab, bare):
                    step()
    by_threads = [f.summary() for f in figures]
    whole = {"jobs": whole_jobs, "warm_jobs": WARM_JOBS, "by_threads": [w.summary() for w in wholes]}
    return {
        "jobs": jobs,
        "rounds": rounds,
        "row": ROW_FIELDS,
        "by_threads": by_threads,
        "ratio": max(r["ratio"] for r in by_threads),  # the worst thread count; goal <= 1.05
        "whole": whole if whole_jobs else {"skipped": "not measured in this run (--whole-jobs 0)"},
    }


def main() -> None:
    """`python -m bench.overhead [--jobs N] [--threads default,1] [--rounds R] [--whole-jobs W]`, or the bare
    loop alone: `bare MODEL_SET MANIFEST OUT_DIR TIMES_JSON THREADS`."""
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
    parser.add_argument(
        "--whole-jobs", type=int, default=WHOLE_JOBS, help=f"whole-system batch rows (default {WHOLE_JOBS}; 0 skips it)"
    )
    args = parser.parse_args()
    figures = run(jobs=args.jobs, rounds=args.rounds, threads=args.threads, whole_jobs=args.whole_jobs)
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
