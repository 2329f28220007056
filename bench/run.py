"""`make bench`: run every CPU benchmark in one go, print a summary, rewrite BENCHMARKS.md.

    python -m bench.run [--rows 100000] [--control-jobs 3000] [--control-rounds 3] [--overhead-jobs 50]
                        [--fairness-jobs 20000] [--only overhead,submit,control,embed,fairness]
                        [--gpu-json gpu.json] [--json out.json]
    python -m bench.run --from-json out.json [--gpu-json gpu.json]   # rewrite BENCHMARKS.md only

What a run does not measure (parts left out with `--only`, benches with runs of their own such
as `bench.table_growth`, the GPU section without `--gpu-json`) is kept from the BENCHMARKS.md
before it, marked as kept, goals with `(earlier run)`. All other ratios in BENCHMARKS.md come
from one run on one machine; absolute figures depend on
the machine and on what else runs on it (the load average at the start is recorded).
A benchmark that fails is reported as failed; the others still run.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from bench.common import REPO, log, machine_info, postgres_available
from bench.report import carry_over, render_markdown, summary_lines

BENCHMARKS_MD: Final = REPO / "BENCHMARKS.md"
ALL: Final = (
    "overhead",
    "submit",
    "control",
    "embed",
    "fairness",
    "batching",
    "api",
    "startup",
    "fast",
    "usage",
    "isolation",
    "polling",
)


def _guarded(name: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """Run one benchmark; a failure becomes `{"error": ...}` so the others still report."""
    t0 = time.perf_counter()
    try:
        figures = fn()
    except Exception as e:
        log(f"{name} FAILED: {e}")
        figures = {"error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-3000:]}
    figures["bench_wall_s"] = time.perf_counter() - t0
    return figures


def _embed_cache(samples: int) -> dict[str, Any]:
    """The embedding-cache benchmark (bench/embed_cache.py, another issue's), when it exists."""
    try:
        module = importlib.import_module("bench.embed_cache")
    except ImportError as e:
        return {"skipped": f"bench/embed_cache.py is not available ({e})"}
    figures: dict[str, Any] = module.run(samples=samples)
    figures["markdown"] = module.to_markdown(figures)
    return figures


def _api(requests: int) -> dict[str, Any]:
    from bench import api

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    figures = api.run(requests=requests)
    figures["markdown"] = api.to_markdown(figures)
    return figures


def _batching(jobs: int) -> dict[str, Any]:
    from bench import batching

    figures = batching.run(jobs=jobs)
    figures["markdown"] = batching.to_markdown(figures)
    log(f"batching: {figures['batch_1_jobs_per_s']:.2f} jobs/s at batch 1, {figures['batch_4_jobs_per_s']:.2f} at 4")
    return figures


def _startup(repetitions: int) -> dict[str, Any]:
    from bench import startup

    figures = startup.run(repetitions=repetitions)
    figures["markdown"] = startup.to_markdown(figures)
    ratios = ", ".join(f"{label} {c['over_baseline']:.2f}x" for label, c in figures["commands"].items())
    log(f"startup against {figures['baseline']}: {ratios}")
    return figures


def _fast_sets(rows: int) -> dict[str, Any]:
    from bench import fast_sets

    figures = fast_sets.run(rows=rows)
    figures["markdown"] = fast_sets.to_markdown(figures)
    log(f"fast sets: {figures['fast_over_default']:.2f}x images/s of the default set (same rows)")
    return figures


def _usage(jobs: int) -> dict[str, Any]:
    from bench import usage

    figures = usage.run(jobs=jobs)
    figures["markdown"] = usage.to_markdown(figures)
    log(f"usage reports: worst {figures['worst_s']:.3f} s over {jobs:,} jobs and the rollup of 100x")
    return figures


def _polling() -> dict[str, Any]:
    """A tenant polling a 100,000-job batch through one `ipab api` (bench/batch_polling.py): PostgreSQL only."""
    if not postgres_available():
        return {"skipped": "no PostgreSQL server on 127.0.0.1:5432"}
    from bench import batch_polling

    figures = batch_polling.run()
    log(f"batch polling: PostgreSQL {figures['db_core_share']:.2f} of a core while a tenant polls a large batch")
    return figures


def two_tenants_phase_s() -> float:
    """bench.two_tenants' own phase length (imported only for its default)."""
    from bench import two_tenants

    return two_tenants.Options.phase_s


def _isolation(phase_s: float) -> dict[str, Any]:
    """Two tenants, one hostile (bench/two_tenants.py), in a loopback-only namespace where it can."""
    from bench import two_tenants

    figures = two_tenants.run(two_tenants.Options(phase_s=phase_s))
    figures["markdown"] = two_tenants.to_markdown(figures)
    p99, webhooks = figures["p99_ratio"], figures["webhook_median_ratio"]
    log(f"isolation: calm beside hostile / alone: p99 {p99:.2f}x, webhook delay {webhooks:.2f}x")
    return figures


def run_all(args: argparse.Namespace) -> dict[str, Any]:
    """Every selected benchmark, one after another, in this process (each starts its own services)."""
    from bench import control_plane, fairness, overhead, submit_throughput

    only = set(args.only.split(",")) if args.only else set(ALL)
    databases = ["sqlite", "postgres"] if postgres_available() else ["sqlite"]
    results: dict[str, Any] = {"machine": machine_info(), "postgres": "postgres" in databases}
    t0 = time.perf_counter()
    if "overhead" in only:
        results["overhead"] = _guarded("overhead", lambda: overhead.run(jobs=args.overhead_jobs))
    if "submit" in only:
        results["submit"] = _guarded(
            "submit", lambda: submit_throughput.run(rows=args.rows, naive_sample=args.naive_sample)
        )
    if "control" in only:
        results["control"] = _guarded(
            "control",
            lambda: control_plane.run(
                jobs=args.control_jobs,
                workers=args.workers,
                databases=databases,  # type: ignore[arg-type]
                rounds=args.control_rounds,
            ),
        )
    if "embed" in only:
        results["embed"] = _guarded("embed", lambda: _embed_cache(args.embed_samples))
    if "fairness" in only:
        results["fairness"] = _guarded("fairness", lambda: fairness.run(bulk_jobs=args.fairness_jobs))
    if "batching" in only:  # tiny-model jobs/s at batch 1 and 4, same run
        results["batching"] = _guarded("batching", lambda: _batching(args.batching_jobs))
    if "api" in only:
        results["api"] = _guarded("api", lambda: _api(args.api_requests))
    if "startup" in only:  # ipab's start-up against celery --help, interleaved, same run
        results["startup"] = _guarded("startup", lambda: _startup(args.startup_repetitions))
    if "fast" in only:  # the tiny fast set against the default set, same rows, same run
        results["fast_sets"] = _guarded("fast_sets", lambda: _fast_sets(args.fast_rows))
    if "usage" in only:  # usage reports over 1M jobs' rollup (and the rollup of 100x as many)
        results["usage"] = _guarded("usage", lambda: _usage(args.usage_jobs))
    if "isolation" in only:  # calm tenant alone and beside a hostile one, same API process
        results["isolation"] = _guarded("isolation", lambda: _isolation(args.isolation_phase_s))
    if "polling" in only:  # a tenant's clients polling a 100,000-job batch: what the database spends
        results["polling"] = _guarded("polling", _polling)
    if args.gpu_json:
        results["gpu"] = json.loads(Path(args.gpu_json).read_text())
    results["total_s"] = time.perf_counter() - t0
    return results


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000, help="manifest rows for the submit benchmark")
    parser.add_argument("--naive-sample", type=int, default=5_000, help="apply_async calls timed for the naive loop")
    parser.add_argument("--overhead-jobs", type=int, default=50)
    parser.add_argument("--control-jobs", type=int, default=3000)
    parser.add_argument(
        "--control-rounds", type=int, default=3, help="control-plane batches per database (median shown)"
    )
    parser.add_argument("--workers", type=int, default=4, help="null-model worker processes")
    parser.add_argument("--embed-samples", type=int, default=200)
    parser.add_argument("--batching-jobs", type=int, default=16, help="tiny-model jobs per batch size")
    parser.add_argument("--api-requests", type=int, default=800, help="requests per measurement of the API bench")
    parser.add_argument("--startup-repetitions", type=int, default=15, help="timed runs of each start-up command")
    parser.add_argument("--fairness-jobs", type=int, default=20_000, help="bulk backlog of the fairness benchmark")
    parser.add_argument("--fast-rows", type=int, default=8, help="tiny-model rows for each set of the fast-set bench")
    parser.add_argument("--usage-jobs", type=int, default=1_000_000, help="finished jobs for the usage-report bench")
    parser.add_argument(
        "--isolation-phase-s", type=float, default=two_tenants_phase_s(), help="each phase of the isolation bench"
    )
    parser.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(ALL)}")
    parser.add_argument("--gpu-json", default=None, help="figures of `python -m bench.gpu --out` to include")
    parser.add_argument("--json", type=Path, default=None, help="also write the raw figures here")
    parser.add_argument("--no-write", action="store_true", help="do not rewrite BENCHMARKS.md")
    parser.add_argument("--from-json", type=Path, default=None, help="rewrite BENCHMARKS.md from a --json file, no run")
    return parser


def main() -> None:
    """Command line (`make bench`)."""
    args = _parser().parse_args()
    results = json.loads(args.from_json.read_text()) if args.from_json else run_all(args)
    if args.from_json and args.gpu_json:
        results["gpu"] = json.loads(Path(args.gpu_json).read_text())
    print("\n".join(summary_lines(results)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))
    if not args.no_write:
        previous = BENCHMARKS_MD.read_text() if BENCHMARKS_MD.exists() else ""
        markdown = render_markdown(results, command=_command(args))
        BENCHMARKS_MD.write_text(carry_over(markdown, previous, ran=set(results)))
        log(f"wrote {BENCHMARKS_MD}")


def _command(args: argparse.Namespace) -> str:
    parts = ["python -m bench.run"]
    defaults = vars(_parser().parse_args([]))
    for key, value in vars(args).items():
        if key not in ("json", "no_write", "from_json") and value != defaults.get(key):
            parts.append(f"--{key.replace('_', '-')} {value}")
    return " ".join(parts)


if __name__ == "__main__":
    main()
