"""Control-plane capacity: end-to-end jobs/s through Redis, SQL and S3 with the model taken out.

4 worker processes run the normal `ipab worker` code path (`bench.null_worker`), whose
model is the `NullRenderer` benchmark fixture (a fixed 64x64 image, no model work). A batch
of N jobs is submitted; jobs/s is measured two ways:

- steady state: (N - 1) / (last `finished_at` - first `finished_at`) from the job rows;
- end to end: N / (all terminal - submit call started), submission included.

Where the time goes: CPU seconds that each process family (workers, Redis, SeaweedFS,
PostgreSQL) spent during the run, per job; and one job's steps timed in-process
(claim SQL, queued-set update, lease thread, cache hit, PNG, S3 put, finish SQL).

Run alone: `python -m bench.control_plane --jobs 3000 --workers 4 [--database postgres]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Final

import redis

from bench.common import (
    Database,
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
    write_manifest,
    write_references,
)
from bench.step_timing import time_steps
from shared.model_set import write_model_set
from shared.settings import Settings

NULL_MODEL_SET: Final = "bench-null"
ROW_FIELDS: Final = {"width": 64, "height": 64, "steps": 1}
WARMUP_JOBS: Final = 40
CLK_TCK: Final = os.sysconf("SC_CLK_TCK")


def write_null_model_set(folder: Path) -> Path:
    """A model-set.toml naming the null model set (its paths are never read)."""
    path = folder / "model-set.toml"
    write_model_set(
        path, name=NULL_MODEL_SET, base="null-base", ip_adapter="null.safetensors", image_encoder="null-encoder"
    )
    return path


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of one process (0 if it is gone)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _pids_by_family(worker_pgids: Sequence[int], svc: Services) -> dict[str, list[int]]:
    """Live pids of the worker process groups, Redis, SeaweedFS and any PostgreSQL backends."""
    families: dict[str, list[int]] = {"workers": [], "redis": [svc.redis.process.pid], "s3": [svc.s3.process.pid]}
    families["postgres"] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        pid, comm, rest = int(entry.name), stat.split("(", 1)[1].rsplit(")", 1)[0], stat.rsplit(")", 1)[1].split()
        if int(rest[2]) in worker_pgids:
            families["workers"].append(pid)
        elif comm.startswith("postgres"):
            families["postgres"].append(pid)
    return families


def _cpu_snapshot(worker_pgids: Sequence[int], svc: Services) -> dict[int, tuple[str, float]]:
    return {pid: (family, _cpu_s(pid)) for family, pids in _pids_by_family(worker_pgids, svc).items() for pid in pids}


def _cpu_per_job_ms(
    before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]], jobs: int
) -> dict[str, float]:
    """CPU milliseconds per job by process family, between two snapshots."""
    spent: dict[str, float] = {}
    for pid, (family, cpu_s) in after.items():
        spent[family] = spent.get(family, 0.0) + cpu_s - before.get(pid, (family, 0.0))[1]
    return {family: 1000 * s / jobs for family, s in spent.items()}


def _wait_for_consumers(settings: Settings, count: int, *, timeout_s: float = 60) -> None:
    """Block until `count` Celery consumers wait on Redis (BRPOP): every worker is up."""
    client = redis.Redis.from_url(settings.redis_url)
    deadline = time.monotonic() + timeout_s
    while sum(1 for c in client.client_list() if c.get("cmd") == "brpop") < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"fewer than {count} workers consume from Redis after {timeout_s:.0f} s")
        time.sleep(0.2)
    client.close()


def _submit(settings: Settings, manifest: Path, batch: str) -> str:
    from scheduler.submission.submit import submit_manifest

    result = submit_manifest(settings=settings, path=manifest, batch_name=batch, model_set_name=NULL_MODEL_SET)
    return result.batch_id


def _run_batch(
    settings: Settings, svc: Services, procs: Sequence[subprocess.Popen[bytes]], manifest: Path, jobs: int
) -> dict[str, Any]:
    sessions = sessions_for(settings)
    pgids = [p.pid for p in procs]
    before = _cpu_snapshot(pgids, svc)
    t0 = time.perf_counter()
    batch_id = _submit(settings, manifest, "control-plane")
    submit_s = time.perf_counter() - t0
    counts = wait_for_batch(sessions, batch_id, timeout_s=600, procs=procs, poll_s=0.05)
    wall_s = time.perf_counter() - t0
    after = _cpu_snapshot(pgids, svc)
    rows = job_rows(sessions, batch_id)
    finished = [r.finished_at.timestamp() for r in rows if r.finished_at]
    steady = steady_state_s_per_job(finished)
    return {
        "jobs": jobs,
        "counts": counts,
        "submit_s": submit_s,
        "wall_s": wall_s,
        "end_to_end_jobs_per_s": jobs / wall_s,
        "steady_state_jobs_per_s": 1 / steady,
        "upload_s_mean": sum(r.upload_s or 0 for r in rows) / max(1, len(rows)),
        "cpu_ms_per_job": _cpu_per_job_ms(before, after, jobs),
    }


def _one_database(svc: Services, kind: Database, *, jobs: int, workers: int) -> dict[str, Any]:
    model_set = write_null_model_set(svc.workdir / f"null-{kind}")
    refs = write_references(svc.workdir / "refs", 3)
    with private_database(kind, svc.workdir) as url:
        settings = bench_settings(svc, url, model_set=model_set, heartbeat_s=10.0, lease_s=60.0)
        warm = write_manifest(svc.workdir / f"warm-{kind}.jsonl", refs, rows=WARMUP_JOBS, fields=ROW_FIELDS)
        manifest = write_manifest(svc.workdir / f"jobs-{kind}.jsonl", refs, rows=jobs, fields=ROW_FIELDS)
        env = settings_env(settings, OMP_NUM_THREADS="1")
        procs = [
            start_worker(env, svc.workdir / f"null-worker-{kind}-{i}.log", module="bench.null_worker")
            for i in range(workers)
        ]
        try:
            _wait_for_consumers(settings, workers)
            wait_for_batch(sessions_for(settings), _submit(settings, warm, "warm-up"), timeout_s=120, procs=procs)
            log(f"control plane: {workers} null workers up on {kind}; {jobs} jobs ...")
            figures = _run_batch(settings, svc, procs, manifest, jobs)
        except Exception as e:
            raise RuntimeError(
                f"control plane on {kind} failed: {e}\n{log_tail(svc.workdir / f'null-worker-{kind}-0.log')}"
            ) from e
        finally:
            stop_workers(procs)
        log(f"control plane: {kind}: {figures['steady_state_jobs_per_s']:.0f} jobs/s steady state")
        figures["steps_ms"] = time_steps(settings, refs)
    return figures


def run(*, jobs: int = 3000, workers: int = 4, databases: Sequence[Database] = ("sqlite",)) -> dict[str, Any]:
    """Control-plane capacity on each database in `databases`."""
    results: dict[str, Any] = {"workers": workers, "jobs": jobs}
    with private_services() as svc:
        for kind in databases:
            results[kind] = _one_database(svc, kind, jobs=jobs, workers=workers)
    return results


def main() -> None:
    """Command line: run the benchmark alone and print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--database", choices=["sqlite", "postgres"], action="append")
    args = parser.parse_args()
    print(json.dumps(run(jobs=args.jobs, workers=args.workers, databases=args.database or ["sqlite"]), indent=2))


if __name__ == "__main__":
    main()
