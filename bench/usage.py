"""Usage reports on the rollup: how long `ipab usage` / GET /v1/usage take over 1M jobs, and over
the rollup rows that 100M jobs would leave.

    python -m bench.usage [--jobs 1000000] [--scale 100] [--databases sqlite,postgres]

1. 1M finished jobs are written to `jobs` (20 tenants over 90 UTC days; per tenant and day a
   plan batch in the scheduled lane, single API jobs in its interactive batch, a weekly bulk
   batch), and the rollup is built from them by the statement that job endings run
   (`shared.usage.roll_up_ended`, here over every job at once).
2. Six reports (`scheduler.usage.report`, a page of at most 1,000 rows as GET /v1/usage answers),
   each the median of 5 runs: one tenant by day and by batch over 30 days (what a tenant asks
   GET /v1/usage); every tenant by day over 90 days, by lane, by model set and by batch (what
   the operator asks). Then every row of the report by batch, streamed as `ipab usage --by batch`
   prints it (an export, not a page: no goal). The first report summed from the 1M job rows
   instead shows what the rollup saves.
3. The rollup rows of `--scale` times the jobs (the same shape with `scale` times the batches,
   written directly): the report's cost follows rollup rows (batches x days), not jobs. At 100x
   the report by batch has about 200,000 rows: a page of it, and all of it.

Goal: every report over 1M jobs under 1 s; a tenant's reports under 1 s over the rollup of 100M.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from datetime import date, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Final, cast

from sqlalchemy import Engine, Table, func, select, true
from sqlalchemy.orm import Session

from bench.common import Database, log, postgres_available, private_database
from scheduler.usage.report import UsageQuery, report_rows, usage_report
from shared.db import Batch, Job, UsageRollup, ensure_database, make_engine, make_session_factory
from shared.usage import roll_up_ended

GOAL_S: Final = 1.0
TENANTS: Final = 20
DAYS: Final = 90
FIRST_DAY: Final = date(2026, 9, 1)
REPEATS: Final = 5
CHUNK: Final = 50_000
MODEL_SETS: Final = ("sdxl-plus", "sdxl-face")
_ROLLUP: Final = cast(Table, UsageRollup.__table__)


def _lane_and_batch(i: int, tenant: int, day: int, copy: int = 0) -> tuple[str, str]:
    kind = i % 10
    if kind < 6:
        return "scheduled", f"t{tenant}-plan-{day}-{copy}"
    if kind < 8:
        return "interactive", f"t{tenant}-api"
    return "bulk", f"t{tenant}-bulk-{day // 7}-{copy}"


def _job_rows(jobs: int) -> Iterator[tuple[Any, ...]]:
    """(id, batch_id, line, dedupe_key, spec, seed, status, attempts, lane, queued_at, started_at, finished_at,
    gpu_s, lost_gpu_s, steps_run, pixel_steps, queue_s, total_s) of finished jobs."""
    for i in range(jobs):
        tenant, day = i % TENANTS, (i // TENANTS) % DAYS
        lane, batch = _lane_and_batch(i // (TENANTS * DAYS), tenant, day)
        end = datetime.combine(FIRST_DAY + timedelta(days=day), datetime.min.time()) + timedelta(seconds=i % 86_000)
        lost = 2.0 if i % 97 == 0 else 0.0
        yield (
            f"job-{i:09d}", batch, i, f"k{i}", "{}", i, "succeeded", 1, lane,
            end - timedelta(seconds=30), end - timedelta(seconds=5), end,
            4.2, lost, 30, 1024 * 1024 * 30, 25.0, 30.0,
        )  # fmt: skip


JOB_COLUMNS: Final = (
    *("id", "batch_id", "line", "dedupe_key", "spec", "seed", "status", "attempts", "lane"),
    *("queued_at", "started_at", "finished_at", "gpu_s", "lost_gpu_s", "steps_run", "pixel_steps", "queue_s"),
    "total_s",
)


def _batches(engine: Engine, jobs: int) -> None:
    names: set[tuple[str, int]] = set()
    for i in range(min(jobs, TENANTS * DAYS * 10)):
        tenant, day = i % TENANTS, (i // TENANTS) % DAYS
        names.add((_lane_and_batch(i // (TENANTS * DAYS), tenant, day)[1], tenant))
    rows = [
        {"id": name, "name": name, "model_set": MODEL_SETS[t % 2], "tenant": f"tenant-{t}", "job_count": 0}
        for name, t in sorted(names)
    ]
    with make_session_factory(engine).begin() as session:
        session.execute(cast(Table, Batch.__table__).insert(), rows)


def _load_jobs(engine: Engine, jobs: int) -> float:
    """Write `jobs` finished jobs in chunks (COPY on PostgreSQL); seconds taken."""
    t0 = time.perf_counter()
    cols = ", ".join(JOB_COLUMNS)
    rows = _job_rows(jobs)
    with engine.begin() as conn:
        raw: Any = conn.connection.driver_connection
        if engine.dialect.name == "postgresql":
            with raw.cursor() as cursor, cursor.copy(f"COPY jobs ({cols}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
        else:
            cursor = raw.cursor()
            marks = ", ".join("?" * len(JOB_COLUMNS))
            chunk: list[tuple[Any, ...]] = []
            for row in rows:
                chunk.append(tuple(str(v) if isinstance(v, datetime) else v for v in row))
                if len(chunk) == CHUNK:
                    cursor.executemany(f"INSERT INTO jobs ({cols}) VALUES ({marks})", chunk)
                    chunk = []
            if chunk:
                cursor.executemany(f"INSERT INTO jobs ({cols}) VALUES ({marks})", chunk)
    return time.perf_counter() - t0


def _roll_up(engine: Engine) -> float:
    """Build the rollup from every job with the job endings' statement; seconds taken."""
    t0 = time.perf_counter()
    with make_session_factory(engine).begin() as session:
        roll_up_ended(session, true())
    return time.perf_counter() - t0


def _synthetic_rollup(engine: Engine, *, jobs: int, scale: int) -> int:
    """The rollup rows of `scale` x `jobs` jobs (scale times the plan and bulk batches), written directly."""
    per_key: dict[tuple[str, date, str, str], int] = {}
    for i in range(min(jobs, TENANTS * DAYS * 10)):
        tenant, day = i % TENANTS, (i // TENANTS) % DAYS
        for copy in range(scale):
            lane, batch = _lane_and_batch(i // (TENANTS * DAYS), tenant, day, copy)
            key = (f"tenant-{tenant}", FIRST_DAY + timedelta(days=day), batch, lane)
            per_key[key] = per_key.get(key, 0) + max(jobs // (TENANTS * DAYS * 10), 1)
    rows = [
        {
            "tenant": t,
            "day": d,
            "batch_id": b,
            "lane": lane,
            "model_set": MODEL_SETS[hash(t) % 2],
            "jobs": n,
            "images": n,
            "gpu_s": 4.2 * n,
            "lost_gpu_s": 0.0,
            "pixel_steps": n * 31_457_280,
            "queue_s": 25.0 * n,
            "total_s": 30.0 * n,
        }
        for (t, d, b, lane), n in per_key.items()
    ]
    with make_session_factory(engine).begin() as session:
        session.execute(_ROLLUP.delete())
        for start in range(0, len(rows), CHUNK):
            session.execute(_ROLLUP.insert(), rows[start : start + CHUNK])
    return len(rows)


LAST_30: Final = (FIRST_DAY + timedelta(days=60), FIRST_DAY + timedelta(days=89))
QUERIES: Final = {
    "one tenant by day, 30 days": UsageQuery(tenant="tenant-7", since=LAST_30[0], until=LAST_30[1], by="day"),
    "one tenant by batch, 30 days": UsageQuery(tenant="tenant-7", since=LAST_30[0], until=LAST_30[1], by="batch"),
    "every tenant by day, 90 days": UsageQuery(since=FIRST_DAY, until=FIRST_DAY + timedelta(days=89), by="day"),
    "every tenant by lane": UsageQuery(by="lane"),
    "every tenant by model set": UsageQuery(by="model_set"),
    "every tenant by batch, a page": UsageQuery(by="batch"),
}
EXPORTS: Final = {"every tenant by batch, every row (ipab usage)": UsageQuery(by="batch")}


def _timed(engine: Engine, call: Callable[[Session], Any]) -> tuple[float, Any]:
    """Median seconds of REPEATS runs of `call` in a fresh transaction each, and its last result."""
    times, result = [], None
    sessions = make_session_factory(engine)
    for _ in range(REPEATS):
        with sessions() as session:
            t0 = time.perf_counter()
            result = call(session)
            times.append(time.perf_counter() - t0)
    return statistics.median(times), result


def _reports(engine: Engine) -> dict[str, dict[str, float]]:
    out = {}
    for label, query in QUERIES.items():
        seconds, report = _timed(engine, lambda s, q=query: usage_report(session=s, query=q))  # type: ignore[misc]
        out[label] = {"seconds": seconds, "rows": len(report.rows)}
    return out


def _count_rows(session: Session, *, query: UsageQuery) -> int:
    return sum(1 for _ in report_rows(session=session, query=query))


def _exports(engine: Engine) -> dict[str, dict[str, float]]:
    """Every row of each export, streamed as `ipab usage` reads them (counted, not printed)."""
    out = {}
    for label, query in EXPORTS.items():
        seconds, rows = _timed(engine, partial(_count_rows, query=query))
        out[label] = {"seconds": seconds, "rows": rows}
    return out


def _midnight(day: date | None) -> datetime:
    assert day is not None
    return datetime.combine(day, datetime.min.time())


def _from_jobs(engine: Engine) -> float:
    """The first report summed from the job rows themselves (what the rollup replaces)."""
    query = QUERIES["one tenant by day, 30 days"]
    day = func.date(Job.finished_at)
    stmt = (
        select(day, func.count(), func.sum(Job.gpu_s))
        .join(Batch, Batch.id == Job.batch_id)
        .where(Batch.tenant == query.tenant, Job.finished_at >= _midnight(query.since))
        .where(Job.finished_at < _midnight(query.until + timedelta(days=1) if query.until else None))
        .group_by(day)
    )
    seconds, _ = _timed(engine, lambda s: s.execute(stmt).all())
    return seconds


def run_one(kind: Database, *, jobs: int, scale: int, workdir: Path) -> dict[str, Any]:
    """Every figure on one database."""
    with private_database(kind, workdir) as url:
        ensure_database(url)
        engine = make_engine(url)
        try:
            _batches(engine, jobs)
            log(f"usage ({kind}): writing {jobs:,} finished jobs")
            load_s = _load_jobs(engine, jobs)
            rollup_s = _roll_up(engine)
            with make_session_factory(engine)() as session:
                rollup_rows = int(session.scalar(select(func.count()).select_from(UsageRollup)) or 0)
                images = int(session.scalar(select(func.sum(UsageRollup.images))) or 0)
            assert images == jobs, (images, jobs)  # every job counted once
            reports, exports = _reports(engine), _exports(engine)
            from_jobs_s = _from_jobs(engine)
            log(f"usage ({kind}): rollup of {scale}x the jobs")
            scaled_rows = _synthetic_rollup(engine, jobs=jobs, scale=scale)
            scaled, scaled_exports = _reports(engine), _exports(engine)
        finally:
            engine.dispose()
    return {
        "jobs": jobs,
        "load_s": load_s,
        "rollup_build_s": rollup_s,
        "rollup_rows": rollup_rows,
        "reports": reports,
        "exports": exports,
        "from_jobs_s": from_jobs_s,
        "scale": scale,
        "scaled_rollup_rows": scaled_rows,
        "scaled_reports": scaled,
        "scaled_exports": scaled_exports,
        "worst_s": max(r["seconds"] for r in reports.values()),
        "scaled_tenant_worst_s": max(r["seconds"] for label, r in scaled.items() if label.startswith("one tenant")),
        "scaled_worst_s": max(r["seconds"] for r in scaled.values()),
    }


def run(*, jobs: int = 1_000_000, scale: int = 100, databases: list[Database] | None = None) -> dict[str, Any]:
    """The figures on each database (PostgreSQL when one is reachable)."""
    kinds: list[Database] = databases or (["sqlite", "postgres"] if postgres_available() else ["sqlite"])
    with tempfile.TemporaryDirectory(prefix="ipab-bench-usage-") as folder:
        per = {kind: run_one(kind, jobs=jobs, scale=scale, workdir=Path(folder)) for kind in kinds}
    worst = {key: max(d[key] for d in per.values()) for key in ("worst_s", "scaled_tenant_worst_s", "scaled_worst_s")}
    return {"databases": per, "goal_s": GOAL_S, **worst}


def to_markdown(figures: dict[str, Any]) -> str:
    """The section of BENCHMARKS.md."""
    per = figures["databases"]
    first = next(iter(per.values()))
    jobs, scale = first["jobs"], first["scale"]
    lines = [
        f"{jobs:,} finished jobs (20 tenants, 90 UTC days), the rollup built from them by the job endings' "
        f"statement, then the rollup rows of {scale}x as many jobs; each report the median of {REPEATS} runs.",
        "",
        "| database | report | 1M jobs: s | rows | " + f"{scale}x jobs: s | rows |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for kind, d in per.items():
        for label, r in [*d["reports"].items(), *d["exports"].items()]:
            scaled = d["scaled_reports"].get(label) or d["scaled_exports"][label]
            cells = [kind, label, f"{r['seconds']:.4f}", f"{r['rows']:,}", f"{scaled['seconds']:.4f}"]
            lines.append("| " + " | ".join([*cells, f"{scaled['rows']:,}"]) + " |")
    lines += ["", "| database | jobs written s | rollup built s | rollup rows | same report from the job rows s |"]
    lines += ["| --- | ---: | ---: | ---: | ---: |"]
    for kind, d in per.items():
        row = f"| {kind} | {d['load_s']:.1f} | {d['rollup_build_s']:.2f} | {d['rollup_rows']:,} ({scale}x: "
        lines.append(row + f"{d['scaled_rollup_rows']:,}) | {d['from_jobs_s']:.3f} |")
    lines += [
        "",
        f"Goal: every report over {jobs:,} jobs under {GOAL_S:g} s (worst: {figures['worst_s']:.3f} s). "
        f"Over the rollup of {scale}x the jobs (and {scale}x the batches): a tenant's reports "
        f"{figures['scaled_tenant_worst_s']:.3f} s at worst, the fleet's {figures['scaled_worst_s']:.3f} s "
        "(a page each; the export of every row has no goal).",
    ]
    return "\n".join(lines)


def main() -> None:
    """Command line: the figures as JSON, then the markdown section."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000_000)
    parser.add_argument("--scale", type=int, default=100)
    parser.add_argument("--databases", default=None, help="comma-separated: sqlite,postgres")
    args = parser.parse_args()
    databases = args.databases.split(",") if args.databases else None
    figures = run(jobs=args.jobs, scale=args.scale, databases=databases)
    print(json.dumps(figures, indent=2))
    print(to_markdown(figures))


if __name__ == "__main__":
    main()
