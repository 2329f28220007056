"""Submit throughput: `ipab submit` of a large manifest vs a raw pipelined LPUSH and a naive Celery loop.

- ipab: `scheduler.submission.submit.submit_manifest` in-process on a manifest of N rows over 10
  reference images: parse and validate every row, read and upload the references, insert
  the jobs in SQL, enqueue them in Redis. Timed end to end.
- floor: the same N Celery messages (`shared.wire.celery_envelope` of the very jobs ipab
  inserted) built and pushed with a pipelined raw `LPUSH` in chunks of 5,000: the least
  any submitter must do to get those messages into Redis. Push-only time is reported too.
- naive: a loop of Celery `apply_async` calls (one round trip each), timed on a sample of
  the same messages and extrapolated as rows/s.

Run alone: `python -m bench.submit_throughput --rows 100000 [--profile]`.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import time
from pathlib import Path
from typing import Any, Final

import redis
from sqlalchemy import select

from bench.common import (
    Database,
    Services,
    bench_settings,
    log,
    postgres_available,
    private_database,
    private_services,
    sessions_for,
    write_manifest,
    write_references,
)
from shared.db import Job, make_engine, make_session_factory
from shared.queue import PIPELINE_CHUNK
from shared.settings import Settings
from shared.spec import parse_spec
from shared.wire import RENDER_TASK, JobMessage, celery_envelope

REFERENCES: Final = 10
MODEL_SET: Final = "bench-submit"
FLOOR_QUEUE: Final = "bench.floor"
NAIVE_QUEUE: Final = "bench.naive"
# Small images: the rows are what is measured, not the size of the images they ask for.
ROW_FIELDS: Final = {"width": 512, "height": 512, "steps": 20}


def _messages(settings: Settings, batch_id: str) -> list[JobMessage]:
    """The messages of every job ipab inserted, rebuilt from SQL (not timed)."""
    sessions = sessions_for(settings)
    with sessions() as session:
        rows = session.execute(select(Job.id, Job.spec).where(Job.batch_id == batch_id)).all()
    return [JobMessage(job_id=i, batch_id=batch_id, spec=parse_spec(json.loads(s))) for i, s in rows]


def measure_floor(client: redis.Redis, messages: list[JobMessage]) -> dict[str, float]:
    """Build the Celery envelopes and LPUSH them in pipelined chunks; seconds for both and for the push alone."""
    client.delete(FLOOR_QUEUE)
    t0 = time.perf_counter()
    envelopes = [
        celery_envelope(task=RENDER_TASK, task_id=m.job_id, queue=FLOOR_QUEUE, args=[m.to_json()]) for m in messages
    ]
    t1 = time.perf_counter()
    for start in range(0, len(envelopes), PIPELINE_CHUNK):
        pipe = client.pipeline(transaction=False)
        pipe.lpush(FLOOR_QUEUE, *envelopes[start : start + PIPELINE_CHUNK])
        pipe.execute()
    t2 = time.perf_counter()
    pushed = client.llen(FLOOR_QUEUE)
    client.delete(FLOOR_QUEUE)
    assert pushed == len(messages), f"floor pushed {pushed} of {len(messages)}"
    return {"floor_s": t2 - t0, "floor_push_only_s": t2 - t1}


def measure_naive(settings: Settings, messages: list[JobMessage]) -> dict[str, float]:
    """A loop of `apply_async`, one message per call, on a sample; rows/s extrapolates."""
    from shared.celery_app import make_celery

    app = make_celery(settings)

    @app.task(name=RENDER_TASK, ignore_result=True)
    def render(raw: Any) -> None:  # never runs here: nothing consumes the naive queue
        del raw

    client = redis.Redis.from_url(settings.redis_url)
    client.delete(NAIVE_QUEUE)
    render.apply_async(args=(messages[0].to_json(),), task_id=messages[0].job_id, queue=NAIVE_QUEUE)  # connect
    t0 = time.perf_counter()
    for m in messages[1:]:
        render.apply_async(args=(m.to_json(),), task_id=m.job_id, queue=NAIVE_QUEUE)
    elapsed_s = time.perf_counter() - t0
    pushed = client.llen(NAIVE_QUEUE)
    client.delete(NAIVE_QUEUE)
    client.close()
    assert pushed == len(messages), f"naive loop pushed {pushed} of {len(messages)}"
    return {"naive_s": elapsed_s, "naive_rows": float(len(messages) - 1)}


def measure_submit(settings: Settings, manifest: Path, *, profile_to: Path | None = None) -> tuple[str, float, int]:
    """Time one `submit_manifest`; returns (batch id, seconds, rows added). Optionally under cProfile."""
    from scheduler.submission.submit import submit_manifest

    profiler = cProfile.Profile() if profile_to else None
    t0 = time.perf_counter()
    if profiler:
        profiler.enable()
    result = submit_manifest(settings=settings, path=manifest, batch_name="bench", model_set_name=MODEL_SET)
    if profiler:
        profiler.disable()
    elapsed_s = time.perf_counter() - t0
    if profiler and profile_to:
        profiler.dump_stats(profile_to)
    assert result.woken and result.added > 0, result
    return result.batch_id, elapsed_s, result.added


def measure_dispatch(settings: Settings, client: redis.Redis, rows: int) -> float:
    """Seconds for one dispatcher, unbounded in depth, to hand every submitted row to Redis."""
    from shared.dispatch.dispatcher import Dispatcher

    deep = settings.model_copy(update={"dispatch_depth": 10**9})
    dispatcher = Dispatcher.from_settings(
        sessions=make_session_factory(make_engine(settings.database_url)),
        redis_client=client,
        settings=deep,
        model_set=MODEL_SET,
    )
    t0 = time.perf_counter()
    moved = 0
    while step := dispatcher.dispatch_once():
        moved += step
    elapsed_s = time.perf_counter() - t0
    assert moved == rows, f"dispatched {moved} of {rows}"
    return elapsed_s


def profile_summary(path: Path, *, top: int = 25) -> str:
    """The top functions of a cProfile dump by cumulative and by own time, as text."""
    out = io.StringIO()
    stats = pstats.Stats(str(path), stream=out).strip_dirs()
    stats.sort_stats("cumulative").print_stats(top)
    stats.sort_stats("tottime").print_stats(top)
    return out.getvalue()


def _one_database(
    svc: Services, kind: Database, manifest: Path, *, naive_sample: int, profile_dir: Path | None
) -> dict[str, Any]:
    with private_database(kind, svc.workdir) as url:
        settings = bench_settings(svc, url)
        client = redis.Redis.from_url(settings.redis_url)
        client.flushdb()
        log(f"submit: ipab submit on {kind} ...")
        profile_to = profile_dir / f"submit-{kind}.prof" if profile_dir else None
        batch_id, submit_s, added = measure_submit(settings, manifest, profile_to=profile_to)
        log(f"submit: {kind}: {added} rows in {submit_s:.1f} s")
        dispatch_s = measure_dispatch(settings, client, added)
        log(f"submit: {kind}: dispatched to Redis in {dispatch_s:.1f} s")
        messages = _messages(settings, batch_id)
        client.flushdb()  # the ipab messages are not needed again; keep Redis memory small
        floor = measure_floor(client, messages)
        naive = measure_naive(settings, messages[:naive_sample])
        client.flushdb()
        client.close()
    figures: dict[str, Any] = {"rows": added, "submit_s": submit_s, "dispatch_s": dispatch_s, **floor, **naive}
    if profile_to:
        figures["profile"] = profile_summary(profile_to)
    return _rates(figures)


def _rates(f: dict[str, Any]) -> dict[str, Any]:
    # Submission writes SQL only (the jobs are durable and wait for admission); the dispatcher
    # moves them to Redis a few at a time in normal operation. `dispatch_rows_per_s` is what it
    # does with an unbounded depth: the whole backlog at once.
    f["dispatch_rows_per_s"] = f["rows"] / f["dispatch_s"]
    f["submit_rows_per_s"] = f["rows"] / f["submit_s"]
    f["floor_rows_per_s"] = f["rows"] / f["floor_s"]
    f["floor_push_only_rows_per_s"] = f["rows"] / f["floor_push_only_s"]
    f["naive_rows_per_s"] = f["naive_rows"] / f["naive_s"]
    f["x_floor"] = f["submit_s"] / f["floor_s"]  # goal <= 3
    f["x_naive"] = f["submit_rows_per_s"] / f["naive_rows_per_s"]  # goal >= 10
    return f


def run(*, rows: int = 100_000, naive_sample: int = 5_000, profile_dir: Path | None = None) -> dict[str, Any]:
    """Submit throughput on SQLite and (when reachable) PostgreSQL; figures by database."""
    results: dict[str, Any] = {"rows": rows, "references": REFERENCES, "naive_sample": naive_sample}
    with private_services() as svc:
        refs = write_references(svc.workdir / "refs", REFERENCES)
        manifest = write_manifest(svc.workdir / "manifest.jsonl", refs, rows=rows, fields=ROW_FIELDS)
        kinds: list[Database] = ["sqlite", "postgres"] if postgres_available() else ["sqlite"]
        for kind in kinds:
            results[kind] = _one_database(svc, kind, manifest, naive_sample=naive_sample, profile_dir=profile_dir)
        if "postgres" not in results:
            results["postgres"] = {"skipped": "no PostgreSQL at 127.0.0.1:5432"}
    return results


def main() -> None:
    """Command line: run the benchmark alone and print its figures as JSON."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--naive-sample", type=int, default=5_000)
    parser.add_argument("--profile", type=Path, default=None, help="folder for cProfile dumps of each submit")
    args = parser.parse_args()
    if args.profile:
        args.profile.mkdir(parents=True, exist_ok=True)
    figures = run(rows=args.rows, naive_sample=args.naive_sample, profile_dir=args.profile)
    for kind in ("sqlite", "postgres"):
        profile = figures.get(kind, {}).pop("profile", None)
        if profile:
            print(f"--- cProfile of ipab submit on {kind} ---\n{profile}")
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
