"""What a tenant polling a large batch costs the central database (a real `ipab api`, PostgreSQL).

A batch of `--jobs` queued jobs (100,000) of one tenant; first, what counting it once costs
PostgreSQL (the backend's CPU for `count_batch`, the median of 5). Then `--clients` threads (8) of
that tenant GET /v1/batches/{id} and GET /v1/batches in turns, as fast as the API answers, for
`--seconds` (10): requests answered 200 and 429, and the CPU every backend of this benchmark's
database spent meanwhile, against what counting the batch at every request would have cost.
The API serves a batch's counts again for COST_FACTOR times what counting it took
(scheduler/api/tallies.py).

Run alone: `python -m bench.batch_polling [--jobs 100000] [--clients 8] [--seconds 10]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import threading
import time
from collections import Counter
from typing import Any

import httpx
from sqlalchemy import text

from bench.common import bench_settings, log, private_database, private_services, start_api
from bench.control_plane import _cpu_ns, _database_pids, write_null_model_set
from bench.job_cost import schedstat_ns
from devkit.rows import queued_batch
from scheduler.api.tallies import COST_FACTOR
from scheduler.batches.counts import count_batch
from scheduler.tenants import create_key
from shared.db import ensure_database, make_engine, make_session_factory

TENANT = "poller"


def _big_batch(database_url: str, jobs: int) -> tuple[str, str, float]:
    """(batch id, the tenant's key, ms of PostgreSQL CPU one count of the batch costs, median of 5)."""
    ensure_database(database_url)
    engine = make_engine(database_url)
    sessions = make_session_factory(engine)
    with sessions.begin() as session:
        key = create_key(session=session, tenant=TENANT).key
        batch_id = queued_batch(session, tenant=TENANT, jobs=jobs, model_set="bench-null")
    with engine.connect() as conn:
        conn.execution_options(isolation_level="AUTOCOMMIT").execute(text("VACUUM ANALYZE jobs"))
    costs = []
    with sessions() as session:
        backend = int(session.execute(text("SELECT pg_backend_pid()")).scalar_one())
        for _ in range(5):
            before = schedstat_ns(backend)  # nanoseconds (a backend is one thread); /proc/<pid>/stat counts 10 ms ticks
            count_batch(session=session, batch_id=batch_id)
            costs.append((schedstat_ns(backend) - before) / 1e6)
    engine.dispose()
    return batch_id, key, statistics.median(costs)


def _poll(url: str, key: str, batch_id: str, until: float, answers: Counter[int]) -> None:
    headers = {"Authorization": f"Bearer {key}"}
    with httpx.Client(base_url=url, headers=headers, timeout=30) as client:
        i = 0
        while time.monotonic() < until:
            path = f"/v1/batches/{batch_id}" if i % 2 else "/v1/batches"
            answers[client.get(path).status_code] += 1
            i += 1


def run(*, jobs: int = 100_000, clients: int = 8, seconds: float = 10.0) -> dict[str, Any]:
    with private_services() as svc, private_database("postgres", svc.workdir) as url:
        settings = bench_settings(svc, url, model_set=write_null_model_set(svc.workdir / "polling"))
        log(f"batch polling: {jobs} jobs in one batch ...")
        batch_id, key, count_ms = _big_batch(url, jobs)
        api, api_url = start_api(settings, svc.workdir / "api-polling.log")
        try:
            answers: Counter[int] = Counter()
            before = {pid: _cpu_ns(pid) for pid in _database_pids(url)}
            t0 = time.monotonic()
            threads = [
                threading.Thread(target=_poll, args=(api_url, key, batch_id, t0 + seconds, answers))
                for _ in range(clients)
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall_s = time.monotonic() - t0
            spent_s = sum(_cpu_ns(pid) - before.get(pid, 0) for pid in _database_pids(url)) / 1e9
        finally:
            api.terminate()
            try:
                api.wait(timeout=10)
            except subprocess.TimeoutExpired:
                api.kill()
                api.wait()
    served = answers[200]
    figures = {
        "jobs": jobs,
        "clients": clients,
        "wall_s": wall_s,
        "count_ms": count_ms,
        "answers": dict(answers),
        "requests_per_s": sum(answers.values()) / wall_s,
        "db_cpu_s": spent_s,
        "db_core_share": spent_s / wall_s,
        "db_ms_per_request": spent_s * 1000 / max(1, served),
        "counted_every_time_core_share": served * count_ms / 1000 / wall_s,
        "cost_factor": COST_FACTOR,
    }
    log(
        f"batch polling: {served} answers in {wall_s:.1f} s; PostgreSQL {figures['db_core_share']:.2f} of a core "
        f"(one count {count_ms:.1f} ms; counted at every request: {figures['counted_every_time_core_share']:.1f})"
    )
    figures["markdown"] = to_markdown(figures)
    return figures


def to_markdown(f: dict[str, Any]) -> str:
    answers = ", ".join(f"{n} x {status}" for status, n in sorted(f["answers"].items()))
    return "\n".join(
        [
            f"One tenant's {f['clients']} clients GET /v1/batches/{{id}} and GET /v1/batches in turns, as fast as "
            f"one `ipab api` answers, for {f['wall_s']:.0f} s; the batch holds {f['jobs']:,} queued jobs "
            "(PostgreSQL). A batch's counts are served again for "
            f"{f['cost_factor']:g}x what counting it took (scheduler/api/tallies.py).",
            "",
            "| requests/s | answers | PostgreSQL CPU, share of a core | PostgreSQL ms per answer "
            "| one count of the batch, ms | if counted at every answer, share of a core |",
            "| ---: | --- | ---: | ---: | ---: | ---: |",
            f"| {f['requests_per_s']:.0f} | {answers} | **{f['db_core_share']:.2f}** | {f['db_ms_per_request']:.2f} "
            f"| {f['count_ms']:.1f} | {f['counted_every_time_core_share']:.2f} |",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    figures = run(jobs=args.jobs, clients=args.clients, seconds=args.seconds)
    print(json.dumps({k: v for k, v in figures.items() if k != "markdown"}, indent=2))
    print(figures["markdown"])


if __name__ == "__main__":
    main()
