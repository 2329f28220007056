"""Batch commands: `ipab db upgrade`, `submit`, `status`, `results`, `batches`.

Each command applies pending migrations itself first (`ensure_database`), so a fresh
database needs no separate `ipab db upgrade`. Each imports what it runs when it runs: the
parsers (and `ipab --help`) load no database, S3 or Redis code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from scheduler.cli.common import API_HELP, batch_arg, database, final_line, read_batch
from scheduler.cli.grid import add_max_rows, grid_summary
from scheduler.cli.retention import duration_arg, expires_after_s
from shared.dispatch.policy import DEFAULT_LANE, LANES
from shared.errors import MAX_LISTED_PROBLEMS, ManifestInvalid
from shared.job_status import DEFAULT_TENANT, STATUSES, JobStatus
from shared.redact import mask_url

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from scheduler.batches.counts import Tally
    from scheduler.submission.submit import SubmitResult
    from shared.db import Batch
    from shared.dispatch.position import Forecast

WATCH_INTERVAL_S: Final = 1.0
BAR_WIDTH: Final = 30


# ipab db upgrade


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    """Apply every pending migration."""
    from shared.db import upgrade_database
    from shared.settings import load_settings

    settings = load_settings()
    upgrade_database(settings.database_url)
    shown = mask_url(settings.database_url)
    print(f"database {shown} is at the latest schema")
    return 0


# ipab submit


def print_problems(problems: Sequence[tuple[int, str, str]]) -> None:
    """The first MAX_LISTED_PROBLEMS problems on stderr, one a line, then how many more there are:
    a manifest of a million bad rows prints a screenful, not a million lines."""
    for line, field_name, reason in problems[:MAX_LISTED_PROBLEMS]:
        print(f"line {line}: {field_name}: {reason}", file=sys.stderr)
    if len(problems) > MAX_LISTED_PROBLEMS:
        rows = len({p[0] for p in problems})
        more = len(problems) - MAX_LISTED_PROBLEMS
        print(f"... and {more} more problem(s) not listed ({len(problems)} in {rows} rows)", file=sys.stderr)


def _print_submit(result: SubmitResult, *, with_id: bool = True) -> None:
    if result.rules_warning is not None:
        print(f"warning: {result.rules_warning}", file=sys.stderr)
    print_problems(result.invalid)
    skipped = f", {result.invalid_rows} invalid row(s) skipped" if result.invalid else ""
    print(
        f"batch {result.batch_name}: {result.added} job(s) added, "
        f"{result.skipped_existing} already in the batch{skipped}"
    )
    uploaded, stored = result.references_uploaded, result.references_stored
    print(f"references: {uploaded + stored} image(s), {uploaded} uploaded, {stored} stored already")
    if not result.added:
        print("nothing to enqueue")
    elif result.woken:
        print(f"queued {result.added} job(s) for {result.queue} in lane {result.lane}; they start in their lane's turn")
    else:
        print(
            f"Redis unreachable: {result.added} job(s) are saved in SQL; the dispatcher (in the workers, or "
            "`ipab reconcile --loop`) finds them within IPAB_DISPATCH_RESCAN_S once Redis is back"
        )
    if with_id:
        print(result.batch_id)


def cmd_submit(args: argparse.Namespace) -> int:
    """Validate a manifest and submit its jobs; the batch id alone on the last line."""
    if args.api:
        from scheduler.cli import api_client

        return api_client.cmd_submit(args)
    from scheduler.submission.grid import is_grid
    from scheduler.submission.manifest import parse_defaults
    from scheduler.submission.submit import submit_manifest
    from scheduler.terminal_progress import Reporter
    from shared.db import ensure_database
    from shared.settings import load_settings
    from shared.storage import ObjectStore

    settings = load_settings()
    ensure_database(settings.database_url)
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket()  # a fresh object store works at once
    path = Path(args.manifest)
    if is_grid(path):
        print(grid_summary(path, max_rows=args.max_rows))
    try:
        result = submit_manifest(
            settings=settings,
            path=path,
            max_grid_rows=args.max_rows,
            progress=Reporter(),
            batch_name=args.batch,
            defaults=parse_defaults(args.set),
            skip_invalid=args.skip_invalid,
            model_set_name=args.model_set,
            tenant=args.tenant,
            lane=args.lane,
            expires_after_s=expires_after_s(args.expires_after),
            store=store,
        )
    except ManifestInvalid as e:
        print_problems(e.problems)
        if e.stopped_after is not None:
            print(f"reading stopped at line {e.stopped_after}: the lines after it were not checked", file=sys.stderr)
        rows = len({p[0] for p in e.problems})
        print(f"{rows} invalid row(s); nothing submitted. Fix them, or pass --skip-invalid", file=sys.stderr)
        return 2
    _print_submit(result, with_id=not args.watch)
    if not args.watch:
        return 0
    # The same watch as `ipab status --watch`, in this process: one start-up fewer for `submit && watch`.
    sys.stdout.flush()  # the summary before the progress on stderr
    with database(settings) as sessions:
        counts = _watch(sessions, result.batch_id, args.interval)
    print(final_line(counts))
    print(result.batch_id)
    return 1 if counts.get(JobStatus.failed.value) else 0


# ipab status


def cache_totals(*, session: Session, batch_id: str) -> dict[str, int | float]:
    """The embedding cache counters of a batch's jobs, summed (hits and misses per level, encodes)."""
    from sqlalchemy import select

    from scheduler.batches.record import RECORDS_CHUNK
    from shared.cache_stats import sum_stats_json
    from shared.db import Job

    stmt = select(Job.cache_stats).where(Job.batch_id == batch_id, Job.cache_stats.is_not(None))
    return sum_stats_json(session.scalars(stmt.execution_options(yield_per=RECORDS_CHUNK)))


def _print_cache(totals: dict[str, float]) -> None:
    if not totals:
        return
    levels = ", ".join(
        f"{level} {int(totals.get(f'{level}_hits', 0))} hit/{int(totals.get(f'{level}_misses', 0))} miss"
        for level in ("lru", "redis", "store")
    )
    print(f"embedding cache: {levels}; {int(totals.get('encodes', 0))} encodes in {totals.get('encode_s', 0):.2f} s")


def _print_status(batch: Batch, tally: Tally) -> None:
    counts, seconds = tally.counts, tally.seconds
    print(f"batch {batch.name} ({batch.id}), model set {batch.model_set}")
    for status in STATUSES:
        print(f"  {status:<10} {counts[status]:>8}")
    print(f"  {'total':<10} {tally.total:>8}")
    print(
        f"time: encode {seconds['encode_s']:.2f} s, denoise {seconds['denoise_s']:.2f} s, "
        f"upload {seconds['upload_s']:.2f} s (summed over jobs)"
    )


def progress_line(counts: dict[str, int]) -> str:
    """`[#####-----] 10/20 done (succeeded 9, failed 1, running 2, queued 8)`."""
    from scheduler.batches.counts import done_of

    total = sum(counts.values())
    done = done_of(counts)
    filled = BAR_WIDTH * done // total if total else BAR_WIDTH
    parts = ", ".join(f"{s} {counts[s]}" for s in STATUSES if counts[s])
    return f"[{'#' * filled}{'-' * (BAR_WIDTH - filled)}] {done}/{total} done ({parts})"


def _watch(sessions: sessionmaker[Session], batch_id: str, interval_s: float) -> dict[str, int]:
    from scheduler.batches.counts import count_batch
    from scheduler.cli.watch import watch_counts
    from scheduler.terminal_progress import Reporter
    from shared.jobs import transaction

    def poll() -> dict[str, int]:
        with transaction(sessions) as session:
            return count_batch(session=session, batch_id=batch_id).counts

    return watch_counts(poll, interval_s=interval_s, line_of=progress_line, reporter=Reporter())


def cmd_status(args: argparse.Namespace) -> int:
    """Counts per status and time spent; with --watch, a progress bar until every job is final."""
    if args.api:
        from scheduler.cli import api_client

        return api_client.cmd_status(args)
    from scheduler.batches.counts import count_batch
    from shared.jobs import transaction
    from shared.settings import load_settings

    with database(load_settings()) as sessions:
        batch = read_batch(sessions, args.batch)
        if args.watch:
            _watch(sessions, batch.id, args.interval)
        with transaction(sessions) as session:
            tally = count_batch(session=session, batch_id=batch.id)
            cache = cache_totals(session=session, batch_id=batch.id)
        forecast = _forecast(sessions, batch) if tally.counts[JobStatus.queued.value] else None
    _print_status(batch, tally)
    _print_forecast(forecast)
    _print_cache(cache)
    return 1 if args.watch and tally.counts[JobStatus.failed.value] else 0


def _forecast(sessions: sessionmaker[Session], batch: Batch) -> Forecast | None:
    """Where the batch's last queued job stands in the policy's order (see shared/dispatch/position.py)."""
    from shared.db import utcnow
    from shared.dispatch.position import dispatched_depth, forecast_batch
    from shared.settings import load_settings

    settings = load_settings()
    return forecast_batch(
        sessions=sessions,
        settings=settings,
        batch_id=batch.id,
        dispatched=dispatched_depth(settings, batch.model_set),
        now=utcnow(),
    )


def _print_forecast(forecast: Forecast | None) -> None:
    if forecast is None:
        return
    eta = f"in about {forecast.eta_s:.0f} s" if forecast.eta_s is not None else "(no recent throughput to estimate)"
    print(f"queue: its last queued job starts after {forecast.position} other job(s) {eta}, by the lane policy")


# ipab results


def cmd_results(args: argparse.Namespace) -> int:
    """One JSON line per job of the batch (in manifest order), optionally only those with --status."""
    if args.api:
        from scheduler.cli import api_client

        return api_client.cmd_results(args)
    from scheduler.batches.record import Audience, BucketUris, batch_records, results_line
    from shared.jobs import transaction
    from shared.settings import load_settings

    settings = load_settings()
    store = BucketUris(settings.s3_bucket)  # names only: no S3 client, no boto3 to import
    with database(settings) as sessions, transaction(sessions) as session:
        batch = batch_arg(session=session, ref=args.batch)
        for record in batch_records(session=session, batch_id=batch.id, status=args.status):
            print(json.dumps(results_line(record, store=store, audience=Audience.OPERATOR), ensure_ascii=False))
    return 0


# ipab batches


def printable(text: str) -> str:
    """`text` with tabs, line breaks, escape sequences and other unprintables shown escaped (`\\t`, `\\x1b`)."""
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def cmd_batches(args: argparse.Namespace) -> int:
    """Every batch, oldest first, with its jobs counted per status."""
    from sqlalchemy import select

    from scheduler.batches.counts import Tally, count_jobs
    from scheduler.batches.record import iso_utc
    from shared.db import Batch
    from shared.jobs import transaction
    from shared.settings import load_settings

    with database(load_settings()) as sessions, transaction(sessions) as session:
        batches = session.scalars(select(Batch).order_by(Batch.created_at, Batch.name)).all()
        tallies = count_jobs(session=session)
    header = ["name", "id", "model_set", "created_at", "jobs", *STATUSES]
    print("\t".join(header))
    for batch in batches:
        per_status = tallies.get(batch.id, Tally()).counts
        name = printable(batch.name)  # a name stored before names were checked must not break the table
        cells = [name, batch.id, batch.model_set, iso_utc(batch.created_at) or "", str(sum(per_status.values()))]
        print("\t".join(cells + [str(per_status[s]) for s in STATUSES]))
    return 0


def register(subparsers: Any) -> None:
    """Add the scheduler's commands to the `ipab` parser."""
    db = subparsers.add_parser("db", help="database schema")
    db_sub = db.add_subparsers(dest="db_command", required=True, metavar="ACTION")
    db_sub.add_parser("upgrade", help="apply pending migrations (other commands do this themselves)").set_defaults(
        func=cmd_db_upgrade
    )

    submit = subparsers.add_parser("submit", help="validate a JSONL/CSV manifest or a grid .toml; enqueue its jobs")
    submit.add_argument("manifest", help="JSONL or CSV; relative reference paths are read from its folder")
    submit.add_argument("--batch", help="batch name (default: manifest name + hash of its content)")
    submit.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="default for every row")
    submit.add_argument("--skip-invalid", action="store_true", help="submit the valid rows, report the others")
    add_max_rows(submit)
    submit.add_argument("--model-set", help="a model-set.toml or a model set name (default: IPAB_MODEL_SET)")
    submit.add_argument("--tenant", default=DEFAULT_TENANT, help="tenant the batch belongs to (default: default)")
    submit.add_argument(
        "--lane", default=DEFAULT_LANE, choices=LANES, help="lane of rows that name none (default: bulk)"
    )
    submit.add_argument(
        "--expires-after",
        type=duration_arg,
        metavar="DURATION",
        help="keep the images of rows that name no expires_after this long once done: 1h, 7d, 30d (up to 3650d) "
        "or never (default: the tenant's retention, else IPAB_RETENTION_OUTPUTS_S)",
    )
    submit.add_argument(
        "--watch",
        action="store_true",
        help="then a progress bar until every job is final, as `ipab status --watch` (exit 1 if any failed)",
    )
    submit.add_argument("--interval", type=float, default=WATCH_INTERVAL_S, help="seconds between polls with --watch")
    submit.add_argument("--api", metavar="URL", help=API_HELP)
    submit.set_defaults(func=cmd_submit)

    status = subparsers.add_parser("status", help="jobs per status in a batch")
    status.add_argument("batch", help="batch name or id")
    status.add_argument("--watch", action="store_true", help="progress bar until every job is final")
    status.add_argument("--interval", type=float, default=WATCH_INTERVAL_S, help="seconds between polls")
    status.add_argument("--api", metavar="URL", help=API_HELP)
    status.set_defaults(func=cmd_status)

    results = subparsers.add_parser("results", help="one JSON line per job")
    results.add_argument("batch", help="batch name or id")
    results.add_argument("--status", choices=STATUSES, help="only jobs with this status")
    results.add_argument("--api", metavar="URL", help=API_HELP)
    results.set_defaults(func=cmd_results)

    subparsers.add_parser("batches", help="every batch with its counts").set_defaults(func=cmd_batches)
