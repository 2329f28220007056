"""Lanes and fair share against plain FIFO, on null workers with a fixed job length.

    python -m bench.fairness [--workers 4] [--bulk-jobs 20000] [--render-ms 50] [--window-s 30] [--policy-only]

Each mode gets fresh SQL and Redis keys on the same private services, and the same load:
tenant a's bulk backlog (`--bulk-jobs`), then, while it drains, interactive probe jobs one at
a time and tenant b's 200 bulk jobs. FIFO is the dispatcher with an unbounded depth: every
job is pushed to Redis in submission order at once, which is what a single Celery queue does;
a single queue has no lanes, so there the probes are plain jobs (lane bulk: an interactive
message would go in at the queue's consumer end, `shared.dispatch.front`).

- interactive start delay: started_at - queued_at of each probe (p95); a probe that has not
  started when the window ends counts as its FIFO estimate (jobs ahead / throughput).
- the same through the CLI (policy mode): probes submitted by `ipab submit --lane interactive`
  subprocesses. `queued_at` is stamped in the transaction that inserts the job, so the delay
  runs from the submission's commit (its wake of the dispatcher included), not from the
  command's start: the CLI's own start-up is not the dispatcher's delay.
- where each probe's delay went (`probe_stages_s`, `cli_probe_stages_s`): [commit to push into
  Redis (the dispatcher's reaction: wake, re-read, mark), push to start (the queue)], in s.
- tenant b's share: b's starts over all starts from b's submission until b's jobs are done
  (or the window ends).
- throughput: jobs finished per second over the window, policy / FIFO.
- dispatcher capacity: jobs/s one dispatcher moves from SQL to Redis with a deep backlog.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Final

import redis
from sqlalchemy import func, select

from bench.common import (
    Services,
    bench_settings,
    log,
    private_database,
    private_services,
    sessions_for,
    settings_env,
    start_worker,
    stop_workers,
    write_manifest,
    write_references,
)
from bench.control_plane import NULL_MODEL_SET, _wait_for_consumers, write_null_model_set
from bench.null_model import RENDER_MS_ENV
from scheduler.submission.submit import submit_manifest
from shared.db import Batch, Job, JobStatus
from shared.dispatch.dispatcher import Dispatcher
from shared.settings import Settings

ROW_FIELDS: Final = {"width": 64, "height": 64, "steps": 1}
FIFO_DEPTH: Final = 10**9
PROBES: Final = 8
CLI_PROBES: Final = 8  # `ipab submit --lane interactive` processes, policy mode only (a p95 of 4 was their worst)
TENANT_B_JOBS: Final = 200


def _submit(settings: Settings, manifest: Path, batch: str, **options: Any) -> str:
    result = submit_manifest(
        settings=settings, path=manifest, batch_name=batch, model_set_name=NULL_MODEL_SET, **options
    )
    return result.batch_id


def _probe_delays(settings: Settings, manifest: Path, *, probes: int, spacing_s: float, lane: str) -> list[str]:
    ids = []
    for i in range(probes):
        ids.append(_submit(settings, manifest, f"probe-{i}", lane=lane, tenant="c"))
        time.sleep(spacing_s)
    return ids


def _cli_probes(settings: Settings, manifest: Path, *, probes: int, spacing_s: float, workdir: Path) -> list[str]:
    """Interactive probes submitted by `ipab submit --lane interactive`, one process each; their batch ids."""
    env = settings_env(settings)
    ids = []
    for i in range(probes):
        command = [sys.executable, "-m", "ipab.cli", "submit", str(manifest), "--batch", f"cli-probe-{i}"]
        command += ["--lane", "interactive", "--tenant", "c", "--model-set", NULL_MODEL_SET]
        done = subprocess.run(command, env=env, cwd=workdir, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"`ipab submit` exited {done.returncode}: {done.stderr[-2000:]}")
        ids.append(done.stdout.strip().splitlines()[-1])  # the batch id alone on the last line
        time.sleep(spacing_s)
    return ids


def _starts(settings: Settings) -> list[tuple[str, Any, Any, str]]:
    """(batch name, queued_at, started_at, tenant) of every started job, in start order."""
    with sessions_for(settings)() as session:
        rows = session.execute(
            select(Batch.name, Job.queued_at, Job.started_at, Batch.tenant)
            .join(Batch, Batch.id == Job.batch_id)
            .where(Job.started_at.is_not(None))
            .order_by(Job.started_at)
        ).all()
    return [(r[0], r[1], r[2], r[3]) for r in rows]


def _finished_per_s(settings: Settings, since: Any, until: Any) -> float:
    with sessions_for(settings)() as session:
        n = session.scalar(
            select(func.count()).where(Job.finished_at >= since, Job.finished_at < until, Job.status == "succeeded")
        )
    seconds: float = (until - since).total_seconds()
    return float(n or 0) / max(seconds, 1e-9)


def _one_mode(svc: Services, mode: str, args: argparse.Namespace, refs: list[Path]) -> dict[str, Any]:
    depth = FIFO_DEPTH if mode == "fifo" else args.depth
    model_set = write_null_model_set(svc.workdir / f"null-{mode}")
    bulk = write_manifest(svc.workdir / f"bulk-{mode}.jsonl", refs, rows=args.bulk_jobs, fields=ROW_FIELDS)
    small = write_manifest(svc.workdir / f"b-{mode}.jsonl", refs, rows=TENANT_B_JOBS, fields=ROW_FIELDS)
    probe = write_manifest(svc.workdir / f"probe-{mode}.jsonl", refs, rows=1, fields=ROW_FIELDS)
    (svc.workdir / mode).mkdir(parents=True, exist_ok=True)
    with private_database("sqlite", svc.workdir / mode) as url:
        settings = bench_settings(svc, url, model_set=model_set, dispatch_depth=depth, heartbeat_s=10.0)
        # Both modes share the Redis server and the queue's name: start from an empty queue, not
        # from the previous mode's leftovers (jobs of another database that workers would skip).
        redis.Redis.from_url(settings.redis_url).flushdb()
        env = settings_env(settings, OMP_NUM_THREADS="1", **{RENDER_MS_ENV: str(args.render_ms)})
        _submit(settings, bulk, "backlog", tenant="a")
        procs = [
            start_worker(env, svc.workdir / f"{mode}-worker-{i}.log", module="bench.null_worker")
            for i in range(args.workers)
        ]
        try:
            _wait_for_consumers(settings, args.workers)
            time.sleep(2.0)  # the backlog is draining
            t0 = _db_now(settings)
            _submit(settings, small, "tenant-b", tenant="b")
            spacing_s = args.window_s / (PROBES + 2)
            lane = "bulk" if mode == "fifo" else "interactive"  # one Celery queue has no lanes
            probe_ids = _probe_delays(settings, probe, probes=PROBES, spacing_s=spacing_s, lane=lane)
            cli_ids = (
                []
                if mode == "fifo"
                else _cli_probes(settings, probe, probes=CLI_PROBES, spacing_s=0.5, workdir=svc.workdir)
            )
            time.sleep(spacing_s)
            t1 = _db_now(settings)
            figures = _measure(settings, t0, t1, probe_ids)
            if cli_ids:
                figures["cli_probe_delays_s"] = _delays(settings, cli_ids, rate=figures["throughput_jobs_per_s"])
                figures["cli_probe_delay_p95_s"] = _p95(figures["cli_probe_delays_s"])
                figures["cli_probe_stages_s"] = _stages(settings, cli_ids)
            figures["probe_stages_s"] = _stages(settings, probe_ids)
            return figures
        finally:
            stop_workers(procs)


def _db_now(settings: Settings) -> Any:
    from shared.db import utcnow

    return utcnow()


def _measure(settings: Settings, t0: Any, t1: Any, probe_ids: list[str]) -> dict[str, Any]:
    rate = _finished_per_s(settings, t0, t1)
    starts = _starts(settings)
    delays = _delays(settings, probe_ids, rate=rate)
    window = [s for s in starts if t0 <= s[2] < t1]
    b_done_at = max((s[2] for s in window if s[3] == "b"), default=t1)
    contested = [s for s in window if s[2] <= b_done_at]
    b_share = sum(1 for s in contested if s[3] == "b") / max(len(contested), 1)
    return {
        "throughput_jobs_per_s": rate,
        "probe_delays_s": delays,
        "probe_delay_p95_s": _p95(delays),
        "tenant_b_share": b_share,
        "tenant_b_started": sum(1 for s in window if s[3] == "b"),
        "window_starts": len(window),
    }


def _delays(settings: Settings, probe_ids: list[str], *, rate: float) -> list[float]:
    """started_at - queued_at of each probe batch's job; one not started yet: jobs ahead / `rate`."""
    delays = []
    with sessions_for(settings)() as session:
        for batch_id in probe_ids:
            queued_at, started_at = session.execute(
                select(Job.queued_at, Job.started_at).where(Job.batch_id == batch_id)
            ).one()
            if started_at is not None:
                delays.append((started_at - queued_at).total_seconds())
            else:  # still queued behind the backlog: how long the jobs ahead of it will take
                ahead = session.scalar(
                    select(func.count()).where(Job.status == JobStatus.queued.value, Job.queued_at < queued_at)
                )
                delays.append(float(ahead or 0) / max(rate, 1e-9))
    return delays


def _stages(settings: Settings, batch_ids: list[str]) -> list[list[float | None]]:
    """Where each probe's delay went: [commit to its push into Redis (the dispatcher's reaction),
    push to start (the queue)]; None for a stage not reached."""
    stages: list[list[float | None]] = []
    with sessions_for(settings)() as session:
        for batch_id in batch_ids:
            queued_at, enqueued_at, started_at = session.execute(
                select(Job.queued_at, Job.enqueued_at, Job.started_at).where(Job.batch_id == batch_id)
            ).one()
            pushed_s = (enqueued_at - queued_at).total_seconds() if enqueued_at else None
            waited_s = (started_at - enqueued_at).total_seconds() if started_at and enqueued_at else None
            stages.append([pushed_s, waited_s])
    return stages


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] if ordered else float("nan")


def dispatcher_capacity(svc: Services, refs: list[Path], *, jobs: int) -> dict[str, Any]:
    """Jobs/s one dispatcher moves from SQL into Redis while a drain keeps the queue from filling."""
    manifest = write_manifest(svc.workdir / "capacity.jsonl", refs, rows=jobs, fields=ROW_FIELDS)
    (svc.workdir / "capacity").mkdir(parents=True, exist_ok=True)
    with private_database("sqlite", svc.workdir / "capacity") as url:
        settings = bench_settings(svc, url, dispatch_depth=256)
        _submit(settings, manifest, "capacity", tenant="a")
        client = redis.Redis.from_url(settings.redis_url)
        queue = f"ipab.render.{NULL_MODEL_SET}"
        stop = threading.Event()
        drain = threading.Thread(target=_drain, args=(client, queue, stop), daemon=True)
        drain.start()
        dispatcher = Dispatcher.from_settings(
            sessions=sessions_for(settings), redis_client=client, settings=settings, model_set=NULL_MODEL_SET
        )
        moved, t0 = 0, time.perf_counter()
        while moved < jobs:
            step = dispatcher.dispatch_once()
            moved += step
            if not step:
                time.sleep(0.001)
        elapsed_s = time.perf_counter() - t0
        stop.set()
        drain.join()
    return {"jobs": jobs, "seconds": elapsed_s, "jobs_per_s": jobs / elapsed_s}


def _drain(client: redis.Redis, queue: str, stop: threading.Event) -> None:
    """A fleet that takes every message at once: the list is emptied as fast as it fills."""
    while not stop.is_set():
        client.delete(queue)
        time.sleep(0.002)


def run(
    *,
    workers: int = 4,
    bulk_jobs: int = 20_000,
    render_ms: int = 50,
    window_s: float = 30.0,
    depth: int | None = None,
    policy_only: bool = False,
) -> dict[str, Any]:
    """Both modes and the dispatcher's capacity, in one run (`depth`: the policy's IPAB_DISPATCH_DEPTH);
    `policy_only`: the policy mode alone (a quicker look at its delays, no ratios)."""
    depth = depth or Settings.model_fields["dispatch_depth"].default
    args = argparse.Namespace(workers=workers, bulk_jobs=bulk_jobs, render_ms=render_ms, window_s=window_s, depth=depth)
    results: dict[str, Any] = {"workers": workers, "bulk_jobs": bulk_jobs, "render_ms": render_ms, "depth": depth}
    results["job_s"] = render_ms / 1000
    with private_services() as svc:
        refs = write_references(svc.workdir / "refs", 3)
        for mode in ("policy",) if policy_only else ("fifo", "policy"):
            log(f"fairness: {mode}, {workers} null workers, {bulk_jobs} bulk jobs of {render_ms} ms ...")
            results[mode] = _one_mode(svc, mode, args, refs)
        if policy_only:
            return results
        log("fairness: dispatcher capacity ...")
        results["dispatcher"] = dispatcher_capacity(svc, refs, jobs=min(bulk_jobs, 10_000))
    policy, fifo = results["policy"], results["fifo"]
    results["throughput_ratio"] = policy["throughput_jobs_per_s"] / max(fifo["throughput_jobs_per_s"], 1e-9)
    return results


def to_markdown(figures: dict[str, Any], *, control_jobs_per_s: float | None) -> str:
    """The section for BENCHMARKS.md."""
    policy, fifo, job_s = figures["policy"], figures["fifo"], figures["job_s"]
    capacity = figures["dispatcher"]["jobs_per_s"]
    versus = f"{capacity / control_jobs_per_s:.1f}x" if control_jobs_per_s else "n/a"
    rows = [
        (
            "interactive job start delay, p95",
            f"{policy['probe_delay_p95_s']:.2f} s ({policy['probe_delay_p95_s'] / job_s:.1f} job durations)",
            f"{fifo['probe_delay_p95_s']:.1f} s ({fifo['probe_delay_p95_s'] / job_s:.0f} job durations)",
            "<= 2 job durations",
        ),
        (
            "interactive start delay via `ipab submit --lane interactive`, p95 (from its commit)",
            _cli_delay_text(policy, job_s),
            "n/a",
            "<= 2 job durations",
        ),
        (
            "tenant b's share of starts while it has work",
            f"{policy['tenant_b_share']:.0%}",
            f"{fifo['tenant_b_share']:.0%}",
            "45-55%",
        ),
        ("throughput, policy / FIFO", f"{figures['throughput_ratio']:.3f}", "1", ">= 0.95"),
        ("dispatcher capacity", f"{capacity:,.0f} jobs/s ({versus} the control plane)", "n/a", ">= 5x"),
    ]
    lines = [
        f"{figures['workers']} null workers, each job a fixed {figures['render_ms']} ms, {figures['bulk_jobs']:,} bulk "
        "jobs of tenant a queued; then tenant b's 200 bulk jobs and interactive probes one at a time. FIFO is the "
        "same system with the dispatcher's depth unbounded (every job in Redis at once, in submission order).",
        "",
        "| measure | lanes + fair share | FIFO | goal |",
        "| --- | ---: | ---: | --- |",
        *[f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows],
        "",
        f"Throughput: {policy['throughput_jobs_per_s']:.1f} jobs/s with the policy (IPAB_DISPATCH_DEPTH="
        f"{figures['depth']}), {fifo['throughput_jobs_per_s']:.1f} with FIFO (run first). The control plane figure is "
        "section 3's steady state (SQLite) from this run.",
    ]
    return "\n".join(lines)


def _cli_delay_text(policy: dict[str, Any], job_s: float) -> str:
    delay_s = policy.get("cli_probe_delay_p95_s")
    if delay_s is None:
        return "not measured"
    return f"{delay_s:.2f} s ({delay_s / job_s:.1f} job durations)"


def main() -> None:
    """Command line: run alone and print the figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--bulk-jobs", type=int, default=20_000)
    parser.add_argument("--render-ms", type=int, default=50)
    parser.add_argument("--window-s", type=float, default=30.0)
    parser.add_argument(
        "--depth", type=int, default=None, help="the policy's IPAB_DISPATCH_DEPTH (default: its default)"
    )
    parser.add_argument("--policy-only", action="store_true", help="skip FIFO and the capacity run (no ratios)")
    args = parser.parse_args()
    figures = run(
        workers=args.workers,
        bulk_jobs=args.bulk_jobs,
        render_ms=args.render_ms,
        window_s=args.window_s,
        depth=args.depth,
        policy_only=args.policy_only,
    )
    print(json.dumps(figures, indent=2, default=str))
    if not args.policy_only:
        print(to_markdown(figures, control_jobs_per_s=None))


if __name__ == "__main__":
    main()
