"""What one job costs the central services, statement by statement (PostgreSQL).

The control-plane bench (bench/control_plane.py) measures the CPU that PostgreSQL and Redis
spend per job in a real run; this census says where it goes. One thread plays the fleet:
for each job, a dispatcher round (the real `Dispatcher`, as a worker's taking of a message
wakes it), the worker's take of the message (RPOP, standing for Celery's BRPOP), its claim,
the queued-set update and the finish; then one reconciler pass. Around each step it reads:

- the SQL statements the step sent (SQLAlchemy's cursor events) and the transactions it ended
  (a COMMIT, or a statement run in autocommit, which is its own transaction);
- the CPU the database's backends spent (`/proc/<pid>/schedstat`, nanoseconds, of every
  backend connected to this benchmark's private database);
- the CPU the Redis server spent (its schedstat).

Celery's own Redis commands (BRPOP, the unacked hash, the ack) are not played here: the
control-plane bench lists every Redis command per job from `INFO commandstats`.

Run alone: `python -m bench.job_cost [--jobs 1000]` (its own services and database).
"""

from __future__ import annotations

import argparse
import json
import re
import socket
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import psycopg
import redis
from sqlalchemy import event
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

from bench.common import (
    Services,
    bench_settings,
    log,
    private_database,
    private_services,
    sessions_for,
    write_manifest,
    write_references,
)
from shared import keys
from shared.dispatch.dispatcher import Dispatcher
from shared.dispatch.wake import refill_level
from shared.jobs import JobResult, claim_job, finish_job
from shared.queue import forget_queued
from shared.reconcile import reconcile_once
from shared.settings import Settings
from shared.wire import decode_render_envelope

NULL_MODEL_SET: Final = "bench-null"  # bench.control_plane's
STEPS: Final = ("dispatch", "take", "claim", "forget", "finish")
_TABLE = re.compile(r"\b(?:UPDATE|INTO|FROM)\s+\"?(\w+)", re.IGNORECASE)


def schedstat_ns(pid: int) -> int:
    """Nanoseconds the process has run on a CPU (0 once it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/schedstat").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 0


def statement_label(sql: str) -> str:
    """`UPDATE jobs`, `INSERT usage_rollup`, `SELECT jobs`, `WITH jobs`: the verb and its first table."""
    text = sql.lstrip()
    verb = text.split(None, 1)[0].upper() if text else "?"
    table = _TABLE.search(text)
    return f"{verb} {table.group(1)}" if table else verb


@dataclass
class _Tally:
    """Per step: statements by label, transactions, and nanoseconds (client wall, SQL server CPU, Redis CPU)."""

    statements: dict[str, Counter[str]] = field(default_factory=lambda: {s: Counter() for s in STEPS})
    commits: Counter[str] = field(default_factory=Counter)
    wall_ns: Counter[str] = field(default_factory=Counter)
    sql_ns: Counter[str] = field(default_factory=Counter)
    redis_ns: Counter[str] = field(default_factory=Counter)
    step: str = ""


class _Census:
    """Counts what the engine sends while a step runs, and what the servers spend on it."""

    def __init__(self, sessions: sessionmaker[Session], database_url: str, redis_pid: int) -> None:
        self.tally = _Tally()
        self._redis_pid = redis_pid
        self._backends = _Backends(database_url)
        engine = sessions.kw["bind"]
        event.listen(engine, "before_cursor_execute", self._statement)
        event.listen(engine, "commit", self._commit)

    def _statement(self, conn: Any, _cursor: Any, sql: str, *_: Any) -> None:
        if self.tally.step:
            self.tally.statements[self.tally.step][statement_label(sql)] += 1
            if conn.get_execution_options().get("isolation_level") == "AUTOCOMMIT":
                self.tally.commits[self.tally.step] += 1  # a statement in autocommit is its own transaction

    def _commit(self, _conn: Any) -> None:
        if self.tally.step:
            self.tally.commits[self.tally.step] += 1

    @contextmanager
    def step(self, name: str) -> Iterator[None]:
        sql0, redis0, t0 = self._backends.cpu_ns(), schedstat_ns(self._redis_pid), time.perf_counter_ns()
        self.tally.step = name
        try:
            yield
        finally:
            self.tally.step = ""
            self.tally.wall_ns[name] += time.perf_counter_ns() - t0
            self.tally.sql_ns[name] += self._backends.cpu_ns() - sql0
            self.tally.redis_ns[name] += schedstat_ns(self._redis_pid) - redis0

    def refresh(self) -> None:
        """Look again for the database's backends (a pool opened a connection)."""
        self._backends.refresh()

    def sql_cpu_ns(self) -> int:
        """CPU nanoseconds the database's backends have spent so far."""
        return self._backends.cpu_ns()

    def close(self) -> None:
        self._backends.close()


class _Backends:
    """The server processes of every connection to one database (but this census's own)."""

    def __init__(self, database_url: str) -> None:
        url = make_url(database_url)
        self._conn = psycopg.connect(
            host=url.host, port=url.port, user=url.username, dbname=url.database, autocommit=True
        )
        self._pids: list[int] = []
        self.refresh()

    def refresh(self) -> None:
        rows = self._conn.execute(
            "SELECT pid FROM pg_stat_activity WHERE datname = current_database() AND pid <> pg_backend_pid()"
        ).fetchall()
        self._pids = [int(r[0]) for r in rows]

    def cpu_ns(self) -> int:
        return sum(schedstat_ns(pid) for pid in self._pids)

    def close(self) -> None:
        self._conn.close()


def _submit(settings: Settings, manifest: Path) -> str:
    from scheduler.submission.submit import submit_manifest

    return submit_manifest(
        settings=settings, path=manifest, batch_name="census", model_set_name=NULL_MODEL_SET
    ).batch_id


def _result(job_id: str) -> JobResult:
    return JobResult(
        output_key=f"outputs/census/{job_id}.1.png",
        output_sha256="0" * 64,
        output_bytes=100,
        encode_s=0.001,
        denoise_s=0.001,
        upload_s=0.001,
        cache_stats="{}",
        render_batch_size=1,
        gpu_s=0.05,
        steps_run=1,
        pixel_steps=4096,
    )


def _play_fleet(census: _Census, settings: Settings, sessions: sessionmaker[Session], jobs: int) -> int:
    """Each job through dispatch, take, claim, forget, finish, one after another; returns the jobs finished."""
    client = redis.Redis.from_url(settings.redis_url)
    queue = keys.render_queue(NULL_MODEL_SET)
    dispatcher = Dispatcher.from_settings(
        sessions=sessions, redis_client=client, settings=settings, model_set=NULL_MODEL_SET
    )
    host, done = socket.gethostname(), 0
    for _ in range(jobs):
        with census.step("dispatch"):
            dispatcher.dispatch_once()
        if not done:
            census.refresh()  # the dispatcher's first round opened the pool's connection
        with census.step("take"):
            raw = client.rpop(queue)
        if not isinstance(raw, bytes):
            break
        job_id = decode_render_envelope(raw).job_id
        with census.step("claim"):
            attempt = claim_job(sessions=sessions, job_id=job_id, worker_host=host, lease_s=60, max_attempts=3)
        with census.step("forget"):
            forget_queued(
                redis_client=client,
                prefix=settings.redis_prefix,
                job_id=job_id,
                model_set=NULL_MODEL_SET,
                signal_at=refill_level(settings.dispatch_depth),
            )
        if attempt is None:
            raise RuntimeError(f"job {job_id} could not be claimed")
        with census.step("finish"):
            finish_job(sessions=sessions, job_id=job_id, attempt=attempt, result=_result(job_id))
        done += 1
    client.close()
    return done


def census(settings: Settings, redis_pid: int, refs: Sequence[Path], *, jobs: int = 1000) -> dict[str, Any]:
    """Per job: statements, transactions and CPU of each step; and one reconciler pass's."""
    manifest = write_manifest(refs[0].parent / "census.jsonl", refs, rows=jobs, fields={"width": 64, "height": 64})
    _submit(settings, manifest)
    sessions = sessions_for(settings)
    tally_census = _Census(sessions, settings.database_url, redis_pid)
    try:
        done = _play_fleet(tally_census, settings, sessions, jobs)
        client = redis.Redis.from_url(settings.redis_url)
        t0_sql, t0 = tally_census.sql_cpu_ns(), time.perf_counter_ns()
        reconcile_once(sessions=sessions, redis_client=client, settings=settings)
        reconcile = {
            "wall_us": (time.perf_counter_ns() - t0) / 1000,
            "sql_cpu_us": (tally_census.sql_cpu_ns() - t0_sql) / 1000,
        }
        client.close()
    finally:
        tally_census.close()
    return _per_job(tally_census.tally, done) | {"jobs": done, "reconcile_pass": reconcile}


def _per_job(tally: _Tally, jobs: int) -> dict[str, Any]:
    steps: dict[str, Any] = {}
    for name in STEPS:
        steps[name] = {
            "statements": {label: n / jobs for label, n in sorted(tally.statements[name].items())},
            "commits": tally.commits[name] / jobs,
            "wall_us": tally.wall_ns[name] / jobs / 1000,
            "sql_cpu_us": tally.sql_ns[name] / jobs / 1000,
            "redis_cpu_us": tally.redis_ns[name] / jobs / 1000,
        }
    total = {key: sum(s[key] for s in steps.values()) for key in ("commits", "wall_us", "sql_cpu_us", "redis_cpu_us")}
    total["statements"] = sum(sum(s["statements"].values()) for s in steps.values())
    return {"steps": steps, "total": total}


def to_markdown(figures: dict[str, Any]) -> str:
    """The table "step: statements per job, transactions, µs" for BENCHMARKS.md."""
    lines = [
        "| step | statements per job | commits per job | client µs | PostgreSQL CPU µs | Redis CPU µs |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for name, s in figures["steps"].items():
        stmts = ", ".join(f"{label} x{n:.2f}" for label, n in s["statements"].items()) or "-"
        lines.append(
            f"| {name} | {stmts} | {s['commits']:.2f} | {s['wall_us']:.0f} | {s['sql_cpu_us']:.0f} "
            f"| {s['redis_cpu_us']:.0f} |"
        )
    t = figures["total"]
    lines.append(
        f"| **per job** | {t['statements']:.2f} statements | {t['commits']:.2f} | {t['wall_us']:.0f} "
        f"| {t['sql_cpu_us']:.0f} | {t['redis_cpu_us']:.0f} |"
    )
    r = figures["reconcile_pass"]
    lines += [
        "",
        f"One reconciler pass after them: {r['sql_cpu_us']:.0f} µs of PostgreSQL CPU ({r['wall_us']:.0f} µs wall); "
        "it runs every IPAB_RECONCILE_INTERVAL_S, not per job.",
    ]
    return "\n".join(lines)


def run(*, jobs: int = 1000) -> dict[str, Any]:
    """The census on its own services and a private PostgreSQL database."""
    with private_services() as svc:
        return _on_services(svc, jobs=jobs)


def _on_services(svc: Services, *, jobs: int) -> dict[str, Any]:
    from bench.control_plane import write_null_model_set

    refs = write_references(svc.workdir / "census-refs", 3)
    with private_database("postgres", svc.workdir) as url:
        settings = bench_settings(svc, url, model_set=write_null_model_set(svc.workdir / "census"))
        log(f"job cost: {jobs} jobs, one at a time, on PostgreSQL ...")
        return census(settings, svc.redis.process.pid, refs, jobs=jobs)


def main() -> None:
    """Command line: run alone and print the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1000)
    figures = run(jobs=parser.parse_args().jobs)
    print(json.dumps(figures, indent=2))
    print(to_markdown(figures))


if __name__ == "__main__":
    main()
