"""`python -m devkit demo`: the whole system on one machine, with nothing configured.

It starts on loopback only what is not configured (Redis, SeaweedFS for S3, a SQLite
file, the tiny model set), starts one worker, submits a manifest over three real photos,
shows progress, prints where the images and their metadata are, and stops only what it
started.
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
from typing import Any

from shared.settings import Settings, load_settings

DEMO_PROMPTS = (
    "a watercolor painting",
    "a bronze statue in a museum",
    "an astronaut on the moon, film photo",
    "a cozy cabin in the snow at night",
)
DEMO_SIZE_PX = 64
DEMO_STEPS = 4


def register(subparsers: Any) -> None:
    """Add `demo`."""
    p: argparse.ArgumentParser = subparsers.add_parser("demo", help="run the whole system locally on a small batch")
    p.add_argument("--dir", type=Path, default=Path(".ipab/demo"), help="where the demo keeps its files")
    p.add_argument("--jobs-per-reference", type=int, default=4, help="jobs for each of the 3 reference photos")
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
            env["IPAB_MODEL_SET"] = str(_tiny_model_set(workdir / "models"))
        yield env
    finally:
        for service in reversed(started):
            service.stop()


def _fresh(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _tiny_model_set(folder: Path) -> Path:
    from devkit.synth import write_tiny_model_set

    toml = folder / "model-set.toml"
    if not toml.exists():
        print("writing the tiny random-weight model set (its images are noise) ...", file=sys.stderr)
        write_tiny_model_set(folder)
    return toml


@contextlib.contextmanager
def worker_process(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """An `ipab worker` in its own process, stopped (warm shutdown, then kill) on exit."""
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ipab.cli", "worker"], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        try:
            yield proc
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def _demo(args: argparse.Namespace) -> int:
    from ipab.cli import main as ipab
    from scheduler.submission.submit import submit_manifest
    from shared.storage import ObjectStore

    t0 = time.monotonic()
    workdir: Path = args.dir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    with local_services(load_settings(), workdir) as service_env:
        os.environ.update(service_env)
        settings = load_settings()
        # 1. Three reference photos and a manifest over them.
        refs = write_reference_photos(workdir / "references")
        manifest = workdir / "manifest.jsonl"
        count = write_manifest(manifest, refs, per_reference=args.jobs_per_reference)
        # 2. One worker, in its own process, as in production.
        with worker_process(dict(os.environ), workdir / "worker.log"):
            # 3. Submit: rows in SQL, each reference uploaded once, messages in Redis.
            ObjectStore.from_settings(settings).ensure_bucket()
            result = submit_manifest(
                settings=settings,
                path=manifest,
                batch_name=f"demo-{time.strftime('%Y%m%d-%H%M%S')}",
                defaults={"width": DEMO_SIZE_PX, "height": DEMO_SIZE_PX, "steps": DEMO_STEPS},
            )
            print(f"submitted {count} jobs as batch {result.batch_id}", file=sys.stderr)
            # 4. Progress until every job has ended.
            ipab(["status", result.batch_id, "--watch"])
        # 5. Where everything is.
        _print_where(settings, result.batch_id, workdir)
        # 6. The batch as a page: a card per job, filterable by status and prompt.
        with contextlib.redirect_stdout(sys.stderr):
            ipab(["gallery", result.batch_id, "--out", str(workdir / "gallery")])
    print(f"demo finished in {time.monotonic() - t0:.0f} s; worker log: {workdir / 'worker.log'}")
    print(f"gallery:   {workdir / 'gallery' / 'index.html'} (open it in a browser)")
    return 0


def _print_where(settings: Settings, batch_id: str, workdir: Path) -> None:
    from ipab.cli import main as ipab
    from shared.storage import ObjectStore

    store = ObjectStore.from_settings(settings)
    results = workdir / "results.jsonl"
    with results.open("w") as out, contextlib.redirect_stdout(out):
        ipab(["results", batch_id])
    rows = [json.loads(line) for line in results.read_text().splitlines()]
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
