"""Table growth (PostgreSQL): the hot paths with 10 thousand and with 10 million finished jobs in `jobs`.

A database that keeps every finished row must not slow the work that is live: claiming a job,
a dispatch round, and `GET /v1/batches/{id}` of a batch in progress are measured in one run,
first over SMALL finished rows, then after growing the table to LARGE (loaded with
generate_series, in chunks, then VACUUM ANALYZE as autovacuum would). Goals: claim and
dispatch within 1.5x, the batch view within 2x. The janitor's purge step (IPAB_JANITOR_BATCH
rows past the metadata's retention) is timed at the large size too.

The finished rows look like a year of real ones: 10k-job batches over two model sets and ten
tenants, every spec a few hundred bytes; a quarter kept for ever, half expiring later, a
quarter whose objects the janitor removed.

    python -m bench.table_growth [--rows 10000000] [--small 10000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Final

from sqlalchemy import Engine, text
from sqlalchemy.orm import Session, sessionmaker

from bench.common import log, machine_info, postgres_available, private_database
from devkit import services
from shared.db import Batch, insert_new_jobs, make_engine, make_session_factory, new_id, upgrade_database, utcnow
from shared.dispatch.dispatcher import backlog, mark_dispatched, next_waiting
from shared.jobs import claim_job, transaction
from shared.settings import Settings

BATCH_JOBS: Final = 10_000  # finished jobs per historical batch
CHUNK_ROWS: Final = 500_000  # rows per INSERT ... SELECT generate_series (one transaction each)
HOT_JOBS: Final = 8_000  # queued jobs of the batch that claims and dispatch rounds take from
VIEW_JOBS: Final = 1_000  # the batch GET /v1/batches/{id} reads: half done, half queued
CLAIMS: Final = 300
DISPATCH_ROUNDS: Final = 40
DISPATCH_TAKE: Final = 64  # jobs a dispatch round hands to Redis
VIEWS: Final = 200
WARM_UP: Final = 10  # untimed runs of each path before each measurement
GOALS: Final = {"claim": 1.5, "dispatch": 1.5, "batch_view": 2.0}
SETTLE_MAX_S: Final = 300.0
DISPATCH_STEPS: Final = ("backlog", "next_waiting", "mark")
SETTLED_DIRTY_BYTES: Final = 64 * 2**20
SPEC_SQL: Final = (
    """'{"params":{"prompt":"a photograph of subject ' || g || ', soft light, 35mm, detailed",'"""
    """ || '"negative_prompt":"blurry, lowres","width":1024,"height":1024,"steps":30,'"""
    """ || '"guidance_scale":5.0,"ip_adapter_scale":0.6,"scheduler":"euler"},"references":'"""
    """ || '[{"sha256":"' || md5('ref' || (g % 97)) || md5('r' || (g % 97)) || '","key":"refs/'"""
    """ || md5('ref' || (g % 97)) || md5('r' || (g % 97)) || '.png"}]}'"""
)


def _batches_sql(first: int, last: int) -> str:
    return f"""
INSERT INTO batches (id, name, model_set, created_at, job_count, tenant, paused, removed_count)
SELECT CAST(md5('batch' || b) AS uuid)::text, 'history-' || b, CASE WHEN b % 2 = 0 THEN 'm' ELSE 'v' END,
       timezone('utc', now()) - interval '400 days' + b * interval '1 minute', {BATCH_JOBS}, 't' || (b % 10),
       false, 0
FROM generate_series({first}, {last}) AS b
"""


def _jobs_sql(first: int, last: int) -> str:
    # g % 4: 0 kept for ever; 1 and 3 expire in the future; 2 removed by the janitor (metadata kept).
    return f"""
INSERT INTO jobs (id, batch_id, line, lane, dedupe_key, spec, seed, status, attempts, attempt_floor, queued_at,
                  enqueued_at, started_at, finished_at, encode_s, denoise_s, upload_s, output_key, output_sha256,
                  output_bytes, worker_host, render_batch_size, expires_after_s, expires_at, data_state,
                  data_removed_at)
SELECT CAST(md5('job' || g) AS uuid)::text,
       CAST(md5('batch' || (g / {BATCH_JOBS})) AS uuid)::text,
       g % {BATCH_JOBS}, 'bulk', md5('key' || g), {SPEC_SQL}, g,
       CASE WHEN g % 20 = 0 THEN 'failed' ELSE 'succeeded' END, 1, 0,
       t.at - interval '2 minutes', t.at - interval '1 minute', t.at - interval '20 seconds', t.at,
       0.01, 18.5, 0.2,
       'outputs/' || CAST(md5('batch' || (g / {BATCH_JOBS})) AS uuid)::text || '/'
         || CAST(md5('job' || g) AS uuid)::text || '.1.png',
       md5('png' || g) || md5('gnp' || g), 1500000, 'gpu-' || (g % 16), 4,
       CASE WHEN g % 4 = 0 THEN NULL ELSE 2592000 END,
       CASE WHEN g % 4 = 0 THEN NULL WHEN g % 4 = 2 THEN t.at + interval '1 day' ELSE t.at + interval '30 days' END,
       CASE WHEN g % 4 = 2 THEN 'removed' END,
       CASE WHEN g % 4 = 2 THEN t.at + interval '1 day' END
FROM generate_series({first}, {last}) AS g,
     LATERAL (SELECT timezone('utc', now()) - interval '400 days' + (g / {BATCH_JOBS}) * interval '1 minute'
             + (g % {BATCH_JOBS}) * interval '1 second' AS at) AS t
"""


def _raw(engine: Engine, sql: str) -> None:
    """Run SQL text as is (no bound parameters: its `:` and `%` are SQL's), in a transaction of its own."""
    with engine.begin() as conn:
        driver = conn.connection.driver_connection
        assert driver is not None
        with driver.cursor() as cursor:
            cursor.execute(sql)


def load_finished(engine: Engine, *, start: int, count: int) -> float:
    """Add `count` finished jobs (numbered from `start`), their batches first; seconds it took."""
    t0 = time.perf_counter()
    first_batch, last_batch = start // BATCH_JOBS, (start + count - 1) // BATCH_JOBS
    _raw(engine, _batches_sql(first_batch, last_batch) + " ON CONFLICT DO NOTHING")
    for chunk in range(start, start + count, CHUNK_ROWS):
        last = min(chunk + CHUNK_ROWS, start + count) - 1
        _raw(engine, _jobs_sql(chunk, last))
        log(f"table growth: {last + 1 - start:,} of {count:,} finished rows loaded")
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM ANALYZE jobs"))
        conn.execute(text("VACUUM ANALYZE batches"))
    took_s = time.perf_counter() - t0
    settle(engine)
    return took_s


def settle(engine: Engine) -> None:
    """A checkpoint, then wait (at most SETTLE_MAX_S) for the OS to write the load's dirty pages: measured
    right after writing gigabytes, every commit's fsync waited behind that write-back."""
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("CHECKPOINT"))
    deadline = time.monotonic() + SETTLE_MAX_S
    while time.monotonic() < deadline and _dirty_bytes() > SETTLED_DIRTY_BYTES:
        time.sleep(1.0)


def _dirty_bytes() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("Dirty:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _queued_batch(sessions: sessionmaker[Session], *, name: str, model_set: str, tenant: str, jobs: int) -> str:
    spec = json.dumps({"params": {"prompt": "hot"}, "references": []})
    with transaction(sessions) as session:
        batch = Batch(id=new_id(), name=name, model_set=model_set, tenant=tenant, job_count=jobs)
        session.add(batch)
        session.flush()
        rows = [(new_id(), i, None, f"k{i}", spec, i, "bulk") for i in range(jobs)]
        insert_new_jobs(session, batch_id=batch.id, queued_at=utcnow(), rows=rows, expires_after_s=2592000)
        return batch.id


def _finish_half(engine: Engine, batch_id: str) -> None:
    with engine.begin() as conn:
        conn.execute(
            text(
                "UPDATE jobs SET status = 'succeeded', attempts = 1, started_at = timezone('utc', now()), "
                "finished_at = timezone('utc', now()), expires_at = timezone('utc', now()) + interval '30 days' "
                "WHERE batch_id = :b AND line % 2 = 0"
            ),
            {"b": batch_id},
        )


def _timed(fn: Callable[[int], Any], repeat: int) -> dict[str, float]:
    times_ms = []
    for i in range(repeat):
        t0 = time.perf_counter()
        fn(i)
        times_ms.append((time.perf_counter() - t0) * 1000)
    ordered = sorted(times_ms)
    return {
        "p10_ms": round(ordered[len(ordered) // 10], 3),  # the least disturbed runs, on a shared machine
        "p50_ms": round(statistics.median(ordered), 3),
        "p95_ms": round(ordered[int(len(ordered) * 0.95) - 1], 3),
        "n": repeat,
    }


class HotPaths:
    """The live work measured at each size: claims, dispatch rounds, the view of a batch in progress."""

    def __init__(self, engine: Engine, settings: Settings) -> None:
        from fastapi.testclient import TestClient

        from scheduler.api.app import create_app
        from scheduler.tenants import create_key

        self.engine = engine
        self.sessions = make_session_factory(engine)
        self.hot = _queued_batch(self.sessions, name="hot", model_set="m", tenant="t0", jobs=HOT_JOBS)
        self.view = _queued_batch(self.sessions, name="view", model_set="v", tenant="acme", jobs=VIEW_JOBS)
        _finish_half(engine, self.view)
        with transaction(self.sessions) as session:
            key = create_key(session=session, tenant="acme").key
        self.headers = {"Authorization": f"Bearer {key}"}
        self.client = TestClient(create_app(settings, dispatcher=False))
        self.client.__enter__()
        with self.sessions() as session:
            ids = session.execute(text("SELECT id FROM jobs WHERE batch_id = :b ORDER BY line"), {"b": self.hot})
            self.to_claim = [row[0] for row in ids]
        self.parts: dict[str, list[float]] = {}  # the dispatch round's three steps, ms

    def close(self) -> None:
        """Let go of the app."""
        self.client.__exit__(None, None, None)

    def _claim(self, _i: int) -> None:
        job_id = self.to_claim.pop()  # from the end: the dispatch rounds take from the front
        assert claim_job(sessions=self.sessions, job_id=job_id, worker_host="bench", lease_s=60, max_attempts=3)

    def _dispatch(self, _i: int) -> None:
        t0 = time.perf_counter()
        found = backlog(sessions=self.sessions, model_set="m")
        t1 = time.perf_counter()
        batch_id, _count = found[("bulk", "t0")][0]
        waiting = next_waiting(sessions=self.sessions, batch_id=batch_id, lane="bulk", limit=DISPATCH_TAKE)
        t2 = time.perf_counter()
        assert len(mark_dispatched(sessions=self.sessions, job_ids=[w.job_id for w in waiting])) == DISPATCH_TAKE
        for part, seconds in (("backlog", t1 - t0), ("next_waiting", t2 - t1), ("mark", time.perf_counter() - t2)):
            self.parts.setdefault(part, []).append(seconds * 1000)

    def _view(self, _i: int) -> None:
        answer = self.client.get(f"/v1/batches/{self.view}", headers=self.headers)
        assert answer.status_code == 200 and answer.json()["total"] == VIEW_JOBS, answer.text

    def measure(self) -> dict[str, dict[str, float]]:
        """p50 and p95 of each hot path, in milliseconds (after a few untimed runs of each)."""
        for i in range(WARM_UP):
            self._claim(i)
            self._view(i)
        self._dispatch(0)
        self.parts.clear()
        figures = {
            "claim": _timed(self._claim, CLAIMS),
            "dispatch": _timed(self._dispatch, DISPATCH_ROUNDS),
            "batch_view": _timed(self._view, VIEWS),
        }
        for part, times_ms in self.parts.items():
            figures[f"dispatch_{part}"] = {"p50_ms": round(statistics.median(times_ms), 3), "n": len(times_ms)}
        return figures


def _janitor_purge_ms(engine: Engine, settings: Settings) -> dict[str, float]:
    """One janitor step deleting IPAB_JANITOR_BATCH rows past a 30-day metadata retention."""
    import redis

    from shared.janitor.outputs import purge_past_retention

    sessions = make_session_factory(engine)
    client = redis.Redis.from_url(settings.redis_url)
    try:

        def step(_i: int) -> None:
            purged, _, _ = purge_past_retention(
                sessions=sessions,
                redis_client=client,
                prefix=settings.redis_prefix,
                retention_s=30 * 86400,
                limit=settings.janitor_batch,
            )
            assert purged == settings.janitor_batch

        return _timed(step, 10)
    finally:
        client.close()


def run(*, rows: int = 10_000_000, small: int = 10_000) -> dict[str, Any]:
    """Measure the hot paths with `small`, then `rows`, finished jobs in the table."""
    workdir = Path(tempfile.mkdtemp(prefix="ipab-bench-growth-"))
    redis_server = services.start_redis(workdir=workdir / "redis")
    try:
        with private_database("postgres", workdir) as url:
            settings = Settings(
                _env_file=None,  # type: ignore[call-arg]
                database_url=url,
                redis_url=redis_server.url,
                redis_prefix="bench-growth:",
                model_set=_model_set(workdir),
                api_rate_per_s=0.0,  # the view is timed back to back: the per-tenant rate limit is not what is measured
            )
            return _run(settings, rows=rows, small=small)
    finally:
        redis_server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def _model_set(workdir: Path) -> Path:
    path = workdir / "model-set.toml"
    path.write_text('name = "v"\nbase = "b"\nip_adapter = "a.safetensors"\nimage_encoder = "e"\n')
    return path


def _run(settings: Settings, *, rows: int, small: int) -> dict[str, Any]:
    upgrade_database(settings.database_url)
    engine = make_engine(settings.database_url)
    figures: dict[str, Any] = {"machine": machine_info(), "rows": rows, "small": small}
    try:
        figures["load_small_s"] = round(load_finished(engine, start=0, count=small), 1)
        paths = HotPaths(engine, settings)
        figures["load_average_at_small"] = round(os.getloadavg()[0], 2)
        figures["at_small"] = paths.measure()
        log(f"table growth: at {small:,} rows {figures['at_small']}")
        figures["load_large_s"] = round(load_finished(engine, start=small, count=rows - small), 1)
        figures["load_average_at_large"] = round(os.getloadavg()[0], 2)
        figures["at_large"] = paths.measure()
        log(f"table growth: at {rows:,} rows {figures['at_large']}")
        paths.close()
        figures["janitor_purge_step"] = _janitor_purge_ms(engine, settings)
        with engine.connect() as conn:
            figures["jobs_table_bytes"] = conn.execute(text("SELECT pg_total_relation_size('jobs')")).scalar()
    finally:
        engine.dispose()
    figures["ratios"] = {
        name: round(figures["at_large"][name]["p50_ms"] / figures["at_small"][name]["p50_ms"], 2) for name in GOALS
    }
    figures["ratios_p10"] = {
        name: round(figures["at_large"][name]["p10_ms"] / figures["at_small"][name]["p10_ms"], 2) for name in GOALS
    }
    return figures


def to_markdown(figures: dict[str, Any]) -> str:
    """The section of BENCHMARKS.md."""
    small, large = figures["small"], figures["rows"]
    names = {
        "claim": "claim a job",
        "dispatch": f"dispatch round ({DISPATCH_TAKE} jobs)",
        "batch_view": "GET /v1/batches/{id}",
    }
    header = f"| hot path | p50 at {small:,} rows (ms) | p50 at {large:,} rows (ms) | ratio | goal"
    lines = [
        f"{header} | p10 ratio | p95 at {large:,} (ms) |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for name, label in names.items():
        a, b = figures["at_small"][name], figures["at_large"][name]
        ratio = figures["ratios"][name]
        verdict = "met" if ratio <= GOALS[name] else "**missed**"
        lines.append(
            f"| {label} | {a['p50_ms']:.2f} | {b['p50_ms']:.2f} | {ratio:.2f}x | <= {GOALS[name]}x ({verdict}) "
            f"| {figures['ratios_p10'][name]:.2f}x | {b['p95_ms']:.2f} |"
        )
    purge = figures["janitor_purge_step"]
    steps = [(p, figures["at_small"][f"dispatch_{p}"], figures["at_large"][f"dispatch_{p}"]) for p in DISPATCH_STEPS]
    parts = ", ".join(f"{part} {a['p50_ms']:.1f} -> {b['p50_ms']:.1f}" for part, a, b in steps)
    lines.append("")
    lines.append(f"A dispatch round's steps, p50 ms at each size: {parts}.")
    lines.append("")
    lines.append(
        f"Loading {large - small:,} rows took {figures['load_large_s']:.0f} s; `jobs` then holds "
        f"{figures['jobs_table_bytes'] / 2**30:.1f} GiB with its indexes. A janitor step purging 500 rows past "
        f"the metadata's retention: p50 {purge['p50_ms']:.0f} ms. Load average (1 min) as each measurement "
        f"started: {figures['load_average_at_small']} and {figures['load_average_at_large']} (2 cores, shared)."
    )
    return "\n".join(lines)


def main() -> None:
    """`python -m bench.table_growth`: measure, print the markdown, write the JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=10_000_000, help="finished rows at the large size")
    parser.add_argument("--small", type=int, default=10_000, help="finished rows at the small size")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args()
    if not postgres_available():
        raise SystemExit("bench.table_growth needs the PostgreSQL at 127.0.0.1:5432")
    figures = run(rows=args.rows, small=args.small)
    if args.json:
        args.json.write_text(json.dumps(figures, indent=2))
    print(to_markdown(figures))


if __name__ == "__main__":
    main()
