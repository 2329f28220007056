"""Control-plane capacity: end-to-end jobs/s through Redis, SQL and S3 with the model taken out.

4 worker processes run the normal `ipab worker` code path (`bench.null_worker`), whose
model is the `NullRenderer` benchmark fixture (a fixed 64x64 image, no model work), with
JSON log lines as deploy/kubernetes configures a fleet (what a worker notes about each job
it claims then counts: a read of the claimed row after each claim once cost the central
database more than the claim and the finish together). A batch
of N jobs is submitted (`--rounds` batches one after another on the same workers: the round whose
central CPU per job is the median gives the figures, every round is listed); jobs/s is measured two ways:

- steady state: (N - 1) / (last `finished_at` - first `finished_at`) from the job rows;
- end to end: N / (all terminal - submit call started), submission included.

Where the time goes: CPU time (`/proc/<pid>/stat`) that each process family
spent during the run, per job. The central services are what a fleet shares, whatever its
size: the SQL server (the backends connected to this run's database), Redis, and the control
loops (dispatcher, reconciler, janitor), which run here in one `ipab reconcile --loop`
process (the workers run with IPAB_RECONCILE_IN_WORKERS=false) so that their CPU is counted
apart from the workers'. The workers' CPU runs on each GPU host and grows with the fleet.
From the central CPU per job: the fleet one central core carries, in GPUs, at 1 and 4 s per
image (1 core / central CPU per job x seconds per image). Also per job: every Redis command
(`INFO commandstats`), the SQL transactions committed (`pg_stat_database`), and on
PostgreSQL the statement census of `bench.job_cost`; and one job's worker steps timed
in-process (claim SQL, queued-set update, lease thread, cache hit, PNG, S3 put, finish SQL).

Run alone: `python -m bench.control_plane --jobs 3000 --workers 4 [--rounds 3] [--database postgres]`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import redis

from bench import job_cost
from bench.common import (
    REPO,
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
CENTRAL: Final = ("postgres", "redis", "control")  # what the whole fleet shares
MONITOR: Final = "ipab-bench-monitor"  # the application name of the benchmark's own SQL connections
SECONDS_PER_IMAGE: Final = (1.0, 4.0)
NS_PER_TICK: Final = 1_000_000_000 // os.sysconf("SC_CLK_TCK")


def write_null_model_set(folder: Path) -> Path:
    """A model-set.toml naming the null model set (its paths are never read)."""
    path = folder / "model-set.toml"
    write_model_set(
        path, name=NULL_MODEL_SET, base="null-base", ip_adapter="null.safetensors", image_encoder="null-encoder"
    )
    return path


def _cpu_ns(pid: int) -> int:
    """User + system CPU nanoseconds of one process, all its threads, the ended ones too (0 if it is gone).

    Clock ticks (`/proc/<pid>/stat`): `schedstat`'s nanoseconds count the main thread only,
    and the dispatcher, the reconciler and a worker's publisher are threads.
    """
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return (int(fields[11]) + int(fields[12])) * NS_PER_TICK


def _as_monitor(database_url: str) -> str:
    """The URL of the benchmark's own connections (the polls of `wait_for_batch`, every 50 ms, about
    0.4 ms of PostgreSQL CPU per job at 3,000 jobs): named, so that `_database_pids` leaves them out."""
    if not database_url.startswith("postgresql"):
        return database_url
    return f"{database_url}{'&' if '?' in database_url else '?'}application_name={MONITOR}"


def _database_pids(database_url: str) -> list[int]:
    """The PostgreSQL server processes working for this run's database (backends, autovacuum)."""
    if not database_url.startswith("postgresql"):
        return []
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    with psycopg.connect(host=url.host, port=url.port, user=url.username, dbname=url.database) as conn:
        rows = conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
            " AND application_name <> %s",
            (MONITOR,),
        ).fetchall()
    return [int(r[0]) for r in rows]


def _pids_by_family(groups: Mapping[str, Sequence[int]], svc: Services, database_url: str) -> dict[str, list[int]]:
    """Live pids of each process group family (workers, control), Redis, SeaweedFS and this database's backends."""
    families: dict[str, list[int]] = {name: [] for name in groups}
    families.update(redis=[svc.redis.process.pid], s3=[svc.s3.process.pid], postgres=_database_pids(database_url))
    family_of = {pgid: name for name, pgids in groups.items() for pgid in pgids}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            pgid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[2])
        except (OSError, IndexError, ValueError):
            continue
        if pgid in family_of:
            families[family_of[pgid]].append(int(entry.name))
    return families


def _cpu_snapshot(groups: Mapping[str, Sequence[int]], svc: Services, database_url: str) -> dict[int, tuple[str, int]]:
    families = _pids_by_family(groups, svc, database_url)
    return {pid: (family, _cpu_ns(pid)) for family, pids in families.items() for pid in pids}


def _cpu_per_job_ms(
    before: dict[int, tuple[str, int]], after: dict[int, tuple[str, int]], jobs: int
) -> dict[str, float]:
    """CPU milliseconds per job by process family, between two snapshots; `central` sums CENTRAL."""
    spent: dict[str, float] = {}
    for pid, (family, cpu_ns) in after.items():
        spent[family] = spent.get(family, 0.0) + cpu_ns - before.get(pid, (family, 0))[1]
    per_job = {family: ns / 1e6 / jobs for family, ns in spent.items()}
    per_job["central"] = sum(per_job.get(family, 0.0) for family in CENTRAL)
    return per_job


def fleet_per_central_core(central_ms_per_job: float) -> dict[str, float]:
    """GPUs one central core keeps busy at each of SECONDS_PER_IMAGE: (1 s / central CPU per job) x s per image."""
    jobs_per_core_s = 1000 / max(central_ms_per_job, 1e-9)
    return {f"{s:g}": jobs_per_core_s * s for s in SECONDS_PER_IMAGE}


def _redis_commands(client: redis.Redis) -> dict[str, tuple[int, int]]:
    """(calls, server microseconds) of each Redis command so far."""
    stats: dict[str, Any] = client.info("commandstats")
    return {name.removeprefix("cmdstat_"): (int(v["calls"]), int(v["usec"])) for name, v in stats.items()}


def _redis_per_job(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]], jobs: int) -> dict[str, Any]:
    """Calls per job and server µs per call of each Redis command between two readings."""
    out: dict[str, Any] = {}
    for name, (calls, usec) in after.items():
        calls0, usec0 = before.get(name, (0, 0))
        if calls > calls0:
            out[name] = {"calls_per_job": (calls - calls0) / jobs, "us_per_call": (usec - usec0) / (calls - calls0)}
    return dict(sorted(out.items(), key=lambda kv: -kv[1]["calls_per_job"]))


def _commits(database_url: str) -> int | None:
    """Transactions committed in this run's PostgreSQL database so far (None on SQLite)."""
    if not database_url.startswith("postgresql"):
        return None
    import psycopg
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    with psycopg.connect(host=url.host, port=url.port, user=url.username, dbname=url.database) as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = current_database()").fetchone()
    return int(row[0]) if row else None


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
    settings: Settings,
    svc: Services,
    procs: Sequence[subprocess.Popen[bytes]],
    control: subprocess.Popen[bytes],
    manifest: Path,
    jobs: int,
    batch: str,
) -> dict[str, Any]:
    sessions = sessions_for(settings.model_copy(update={"database_url": _as_monitor(settings.database_url)}))
    client = redis.Redis.from_url(settings.redis_url)
    groups = {"workers": [p.pid for p in procs], "control": [control.pid]}
    commits0, commands0 = _commits(settings.database_url), _redis_commands(client)
    before = _cpu_snapshot(groups, svc, settings.database_url)
    t0 = time.perf_counter()
    batch_id = _submit(settings, manifest, batch)
    submit_s = time.perf_counter() - t0
    counts = wait_for_batch(sessions, batch_id, timeout_s=600, procs=[*procs, control], poll_s=0.05)
    wall_s = time.perf_counter() - t0
    after = _cpu_snapshot(groups, svc, settings.database_url)
    commits1, commands1 = _commits(settings.database_url), _redis_commands(client)
    client.close()
    rows = job_rows(sessions, batch_id)
    finished = [r.finished_at.timestamp() for r in rows if r.finished_at]
    steady = steady_state_s_per_job(finished)
    cpu = _cpu_per_job_ms(before, after, jobs)
    return {
        "jobs": jobs,
        "counts": counts,
        "submit_s": submit_s,
        "wall_s": wall_s,
        "end_to_end_jobs_per_s": jobs / wall_s,
        "steady_state_jobs_per_s": 1 / steady,
        "upload_s_mean": sum(r.upload_s or 0 for r in rows) / max(1, len(rows)),
        "cpu_ms_per_job": cpu,
        "fleet_per_central_core": fleet_per_central_core(cpu["central"]),
        "redis_commands_per_job": _redis_per_job(commands0, commands1, jobs),
        "sql_commits_per_job": (commits1 - commits0) / jobs if commits0 is not None and commits1 else None,
    }


def _start_control_loops(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    """`ipab reconcile --loop` (dispatcher, reconciler, janitor) in its own process group."""
    with log_path.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "ipab.cli", "reconcile", "--loop"],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def _median_round(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The figures of the round whose central CPU per job is the median (every figure then comes from
    one round), with every round's central CPU and jobs/s beside them: on a shared machine, a round
    can land in a busy minute, and one round alone said more about the minute than about the code."""
    ranked = sorted(rounds, key=lambda r: r["cpu_ms_per_job"]["central"])
    median = dict(ranked[len(ranked) // 2])
    median["rounds"] = [
        {"central_ms": r["cpu_ms_per_job"]["central"], "steady_state_jobs_per_s": r["steady_state_jobs_per_s"]}
        for r in rounds
    ]
    return median


def _one_database(svc: Services, kind: Database, *, jobs: int, workers: int, rounds: int = 1) -> dict[str, Any]:
    model_set = write_null_model_set(svc.workdir / f"null-{kind}")
    refs = write_references(svc.workdir / "refs", 3)
    with private_database(kind, svc.workdir) as url:
        settings = bench_settings(
            svc,
            url,
            model_set=model_set,
            heartbeat_s=10.0,
            lease_s=60.0,
            reconcile_in_workers=False,
            log_format="json",  # as deployed (deploy/kubernetes/config.yaml)
        )
        warm = write_manifest(svc.workdir / f"warm-{kind}.jsonl", refs, rows=WARMUP_JOBS, fields=ROW_FIELDS)
        manifest = write_manifest(svc.workdir / f"jobs-{kind}.jsonl", refs, rows=jobs, fields=ROW_FIELDS)
        env = settings_env(settings, OMP_NUM_THREADS="1")
        procs = [
            start_worker(env, svc.workdir / f"null-worker-{kind}-{i}.log", module="bench.null_worker")
            for i in range(workers)
        ]
        control = _start_control_loops(env, svc.workdir / f"control-{kind}.log")
        try:
            _wait_for_consumers(settings, workers)
            wait_for_batch(sessions_for(settings), _submit(settings, warm, "warm-up"), timeout_s=120, procs=procs)
            log(f"control plane: {workers} null workers up on {kind}; {rounds} rounds of {jobs} jobs ...")
            figures = _median_round(
                [_run_batch(settings, svc, procs, control, manifest, jobs, f"control-plane-{r}") for r in range(rounds)]
            )
        except Exception as e:
            raise RuntimeError(
                f"control plane on {kind} failed: {e}\n{log_tail(svc.workdir / f'null-worker-{kind}-0.log')}"
            ) from e
        finally:
            stop_workers([*procs, control])
        cpu = figures["cpu_ms_per_job"]
        log(
            f"control plane: {kind}: {figures['steady_state_jobs_per_s']:.0f} jobs/s steady state; central CPU "
            f"{cpu['central']:.3f} ms per job (SQL {cpu.get('postgres', 0):.3f}, Redis {cpu['redis']:.3f}, "
            f"control loops {cpu['control']:.3f}), workers {cpu['workers']:.2f}"
        )
        figures["steps_ms"] = time_steps(settings, refs)
        if kind == "postgres":
            figures["census"] = job_cost.census(settings, svc.redis.process.pid, refs)
    return figures


def run(
    *, jobs: int = 3000, workers: int = 4, databases: Sequence[Database] = ("sqlite",), rounds: int = 1
) -> dict[str, Any]:
    """Control-plane capacity on each database in `databases`: `rounds` batches of `jobs` one after
    another on the same workers, the median round's figures."""
    results: dict[str, Any] = {"workers": workers, "jobs": jobs, "rounds": rounds}
    with private_services() as svc:
        for kind in databases:
            results[kind] = _one_database(svc, kind, jobs=jobs, workers=workers, rounds=rounds)
    return results


def main() -> None:
    """Command line: run the benchmark alone and print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=1, help="batches one after another; the median round is shown")
    parser.add_argument("--database", choices=["sqlite", "postgres"], action="append")
    args = parser.parse_args()
    databases = args.database or ["sqlite"]
    print(json.dumps(run(jobs=args.jobs, workers=args.workers, databases=databases, rounds=args.rounds), indent=2))


if __name__ == "__main__":
    main()
