"""`python -m devkit demo`: the whole system on one machine, with nothing configured.

It starts on loopback only what is not configured (Redis, SeaweedFS for S3, a SQLite
file, the tiny model set), starts one worker, submits a manifest over three real photos,
shows progress, prints where the images and their metadata are, and stops only what it
started.

Beside it, a second worker serves the tiny fast set (`model-set-fast.toml` of `devkit synth`:
a LoRA fused at load, TCD, 4 steps, no guidance), as a fleet runs one worker per model set;
one job per photo goes to it, submitted by naming that set's toml, so the set's `[defaults]`
and `[limits]` apply, and the demo shows its results with the LoRA their provenance names.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

from shared.settings import Settings, load_settings

DEMO_PROMPTS = (
    "a watercolor painting",
    "a bronze statue in a museum",
    "an astronaut on the moon, film photo",
    "a cozy cabin in the snow at night",
)
DEMO_SIZE_PX = 64
DEMO_STEPS = 4
TINY_SET_TOML: Final = "model-set.toml"
FAST_SET_TOML: Final = "model-set-fast.toml"  # devkit synth's fast set


def register(subparsers: Any) -> None:
    """Add `demo`."""
    p: argparse.ArgumentParser = subparsers.add_parser("demo", help="run the whole system locally on a small batch")
    p.add_argument("--dir", type=Path, default=Path(".ipab/demo"), help="where the demo keeps its files")
    p.add_argument("--jobs-per-reference", type=int, default=4, help="jobs for each of the 3 reference photos")
    p.add_argument(
        "--no-fast-set",
        dest="fast_set",
        action="store_false",
        help="skip the fast set's worker and jobs (a LoRA, TCD, 4 steps, no guidance: one job per photo)",
    )
    p.set_defaults(func=_demo)


def write_reference_photos(folder: Path) -> list[Path]:
    """Three real photos that scikit-image ships, as PNG and JPEG files."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    # scikit-image ships these photos (no network); its functions are untyped.
    photos = {
        "astronaut.png": data.astronaut(),  # type: ignore[no-untyped-call]
        "coffee.jpg": data.coffee(),  # type: ignore[no-untyped-call]
        "chelsea.png": data.chelsea(),  # type: ignore[no-untyped-call]
    }
    paths = []
    for name, pixels in photos.items():
        path = folder / name
        Image.fromarray(pixels).convert("RGB").resize((224, 224)).save(path)
        paths.append(path)
    return paths


def write_manifest(path: Path, references: list[Path], *, per_reference: int) -> int:
    """A JSONL manifest: `per_reference` prompts and seeds for each reference photo."""
    rows = []
    for i, ref in enumerate(references):
        for j in range(per_reference):
            prompt = DEMO_PROMPTS[j % len(DEMO_PROMPTS)]
            rows.append({"id": f"{ref.stem}-{j}", "reference": str(ref), "prompt": prompt, "seed": 1000 * i + j})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


@contextlib.contextmanager
def local_services(settings: Settings, workdir: Path) -> Iterator[dict[str, str]]:
    """IPAB_* variables for whatever is not configured, backed by services started here."""
    from devkit import services

    env: dict[str, str] = {}
    started: list[services.Service] = []
    configured = settings.model_fields_set
    try:
        if "redis_url" not in configured:
            started.append(services.start_redis(workdir=_fresh(workdir / "redis")))
            env["IPAB_REDIS_URL"] = started[-1].url
            print(f"started redis-server on {started[-1].url}", file=sys.stderr)
        if "s3_endpoint_url" not in configured:
            started.append(services.start_seaweedfs(workdir=workdir / "s3"))
            env["IPAB_S3_ENDPOINT_URL"] = started[-1].url
            env.setdefault("AWS_ACCESS_KEY_ID", os.environ.get("AWS_ACCESS_KEY_ID", "ipab-demo"))
            env.setdefault("AWS_SECRET_ACCESS_KEY", os.environ.get("AWS_SECRET_ACCESS_KEY", "ipab-demo"))
            print(f"started SeaweedFS (S3) on {started[-1].url}", file=sys.stderr)
        if "database_url" not in configured:
            env["IPAB_DATABASE_URL"] = f"sqlite:///{(workdir / 'ipab.db').resolve()}"
        if "model_set" not in configured:
            env["IPAB_MODEL_SET"] = str(tiny_model_set(workdir / "models"))
        yield env
    finally:
        for service in reversed(started):
            service.stop()


def _fresh(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def tiny_model_set(folder: Path, *, fast: bool = False) -> Path:
    """The tiny set's default toml (or its fast set's) under `folder`, written there unless it is."""
    from devkit.synth import write_tiny_model_set

    tomls = (folder / TINY_SET_TOML, folder / FAST_SET_TOML)
    # A demo folder from before the fast set has only the default toml: write both again.
    if not all(toml.exists() for toml in tomls):
        print("writing the tiny random-weight model set (its images are noise) ...", file=sys.stderr)
        write_tiny_model_set(folder)
    return tomls[fast]


@contextlib.contextmanager
def demo_workers(workdir: Path, *, fast_set: Path | None) -> Iterator[None]:
    """An `ipab worker` process for IPAB_MODEL_SET and, given `fast_set`, one for that set (a worker
    serves one model set), as in production; on exit all stop at once (warm shutdown, then kill)."""
    envs = {"worker.log": dict(os.environ)}
    if fast_set is not None:
        envs["worker-fast.log"] = {**os.environ, "IPAB_MODEL_SET": str(fast_set)}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for log_name, env in envs.items():
            with (workdir / log_name).open("wb") as log:  # the worker writes to its own copy of the descriptor
                command = [sys.executable, "-m", "ipab.cli", "worker"]
                procs.append(subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT))
        yield
    finally:
        _stop(procs)


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in procs:  # all first: each warm shutdown takes a second or two
        proc.terminate()
    for proc in procs:
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _demo(args: argparse.Namespace) -> int:
    from ipab.cli import main as ipab

    t0 = time.monotonic()
    workdir: Path = args.dir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    with local_services(load_settings(), workdir) as service_env:
        os.environ.update(service_env)
        settings = load_settings()
        # 1. Three reference photos, and the fast set (written with the tiny set) unless skipped.
        refs = write_reference_photos(workdir / "references")
        fast_set = tiny_model_set(workdir / "models", fast=True) if args.fast_set else None
        # 2. One worker per model set, each in its own process, as in production.
        with demo_workers(workdir, fast_set=fast_set):
            # 3. Submit: rows in SQL, each reference uploaded once, messages in Redis; progress until
            #    every job has ended.
            batch_id = _submit(settings, workdir / "manifest.jsonl", refs, per_reference=args.jobs_per_reference)
            ipab(["status", batch_id, "--watch"])
            # 4. Then the fast set's jobs, once the first batch is done: two workers rendering at
            #    once on a small CPU slow each other down far more than they gain.
            fast_id = None if fast_set is None else _fast_batch(settings, workdir, refs, fast_set)
        # 5. Where everything is.
        _print_where(settings, batch_id, workdir)
        if fast_id:
            _print_fast_set(fast_id, workdir)
        # 6. The batch as a page: a card per job, filterable by status and prompt.
        with contextlib.redirect_stdout(sys.stderr):
            ipab(["gallery", batch_id, "--out", str(workdir / "gallery")])
    print(f"demo finished in {time.monotonic() - t0:.0f} s; worker logs: {workdir}/worker*.log")
    print(f"gallery:   {workdir / 'gallery' / 'index.html'} (open it in a browser)")
    return 0


def _submit(
    settings: Settings, manifest: Path, refs: list[Path], *, per_reference: int = 1, model_set: Path | None = None
) -> str:
    """Submit `per_reference` rows a photo, to IPAB_MODEL_SET's workers or to `model_set`'s; the batch id.

    Rows on IPAB_MODEL_SET are the demo's size and steps; rows on `model_set` are its size and
    take the rest (scheduler, steps, guidance) from that set's `[defaults]`.
    """
    from scheduler.submission.submit import submit_manifest
    from shared.storage import ObjectStore

    count = write_manifest(manifest, refs, per_reference=per_reference)
    size = {"width": DEMO_SIZE_PX, "height": DEMO_SIZE_PX}
    ObjectStore.from_settings(settings).ensure_bucket()
    result = submit_manifest(
        settings=settings,
        path=manifest,
        batch_name=f"demo{'' if model_set is None else '-fast'}-{time.strftime('%Y%m%d-%H%M%S')}",
        defaults=size if model_set else {**size, "steps": DEMO_STEPS},
        model_set_name=None if model_set is None else str(model_set),
    )
    on = "" if model_set is None else f" on the fast set {model_set.name}"
    print(f"submitted {count} jobs{on} as batch {result.batch_id}", file=sys.stderr)
    return result.batch_id


def _fast_batch(settings: Settings, workdir: Path, refs: list[Path], fast_set: Path) -> str:
    """One job per photo on the fast set, submitted and watched until done; the batch id."""
    from ipab.cli import main as ipab

    batch_id = _submit(settings, workdir / "manifest-fast.jsonl", refs, model_set=fast_set)
    ipab(["status", batch_id, "--watch"])
    return batch_id


def _results(batch_id: str, path: Path) -> list[dict[str, Any]]:
    """`ipab results BATCH` written to `path`, and its rows."""
    from ipab.cli import main as ipab

    with path.open("w") as out, contextlib.redirect_stdout(out):
        ipab(["results", batch_id])
    return [json.loads(line) for line in path.read_text().splitlines()]


def _print_where(settings: Settings, batch_id: str, workdir: Path) -> None:
    from shared.storage import ObjectStore

    store = ObjectStore.from_settings(settings)
    results = workdir / "results.jsonl"
    rows = _results(batch_id, results)
    copies = workdir / "outputs"
    copies.mkdir(exist_ok=True)
    print(f"\nSQL rows:  {settings.database_url} (tables batches, jobs, reference_images)")
    print(f"results:   {results} (one JSON line per job; `ipab results {batch_id}`)")
    print(f"images:    {store.uri(f'outputs/{batch_id}/')}  (local copies in {copies})")
    for row in rows:
        if row["output_uri"]:
            key = row["output_uri"].removeprefix(f"s3://{store.bucket}/")
            (copies / f"{row['job_id']}.png").write_bytes(store.get(key))
        shown = {k: row[k] for k in ("status", "seed", "prompt", "output_uri", "output_sha256")}
        print("  " + json.dumps(shown))


def _print_fast_set(batch_id: str, workdir: Path) -> None:
    """The fast set's jobs: their settings (the set's defaults) and the LoRAs their provenance names."""
    results = workdir / "results-fast.jsonl"
    rows = _results(batch_id, results)
    succeeded = sum(row["status"] == "succeeded" for row in rows)
    print(f"\nfast set:  {succeeded}/{len(rows)} succeeded; results: {results} (`ipab results {batch_id}`)")
    for row in rows:
        provenance = row["provenance"] or {}  # None for a job that failed before rendering
        loras = [{k: lora[k] for k in ("name", "scale", "sha256")} for lora in provenance.get("loras", [])]
        shown = {k: row[k] for k in ("status", "seed", "scheduler", "steps", "guidance_scale", "output_uri")}
        print("  " + json.dumps({**shown, "loras": loras}))
