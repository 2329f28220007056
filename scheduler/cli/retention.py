"""Data lifecycle commands: `ipab delete BATCH|JOB`, `ipab janitor`, `ipab tenants list|set|delete`.

Each imports what it runs when it runs: the parsers load no database, S3 or Redis code.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from scheduler.cli.common import database
from shared.errors import InvalidInput
from shared.retention import format_duration, parse_duration

if TYPE_CHECKING:
    import redis
    from sqlalchemy.orm import Session

    from shared.settings import Settings


def duration_arg(text: str) -> str:
    """`--expires-after`: a retention as people write it (`7d`, `12h`, `never`), checked as it is parsed."""
    try:
        parse_duration(text, field="--expires-after")
    except InvalidInput as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def expires_after_s(text: str | None) -> int | None:
    """The seconds of a checked `--expires-after` (FOREVER for never), None when not given."""
    return None if text is None else parse_duration(text, field="--expires-after")


def _redis(settings: Settings) -> redis.Redis:
    from shared.redis_conn import connect_redis

    return connect_redis(settings.redis_url)


def _find(session: Session, ref: str) -> tuple[str, str, str]:
    """("batch" or "job", its id, its name for messages) of what REF names."""
    from scheduler.batches.lookup import find_batch, find_job
    from shared.errors import NotFound

    try:
        batch = find_batch(session=session, ref=ref)
        return "batch", batch.id, f"batch {batch.name}"
    except NotFound:
        pass
    try:
        job, _ = find_job(session=session, job_id=ref)
        return "job", job.id, f"job {job.id}"
    except NotFound:
        raise InvalidInput(
            "BATCH|JOB", ref, "no batch has this name or id and no job this id; `ipab batches` lists batches"
        ) from None


def cmd_delete(args: argparse.Namespace) -> int:
    """Ask for a batch's or a job's deletion; the janitor removes its images and records."""
    from scheduler.batches.deletion import mark_batch_jobs, request_batch_deletion, request_job_deletion
    from shared.janitor.loop import wake_janitor
    from shared.jobs import transaction
    from shared.settings import load_settings

    settings = load_settings()
    with database(settings) as sessions:
        with transaction(sessions) as session:
            kind, found_id, shown = _find(session, args.target)
            if kind == "batch":
                request_batch_deletion(session=session, batch_id=found_id)
                marked = 0
            else:
                marked = request_job_deletion(session=session, job_id=found_id)
        if kind == "batch":  # in chunks, after the batch's own mark: other tenants' writes do not wait for it
            marked = mark_batch_jobs(sessions=sessions, batch_id=found_id)
    client = _redis(settings)
    try:
        woken = wake_janitor(redis_client=client, prefix=settings.redis_prefix)
    finally:
        client.close()
    when = "now" if woken else "within IPAB_JANITOR_INTERVAL_S (Redis did not answer)"
    print(
        f"deletion of {shown} asked for: {marked} job(s) newly marked; queued ones are canceled, running ones go "
        f"once they finish. The janitor (in the workers, or `ipab reconcile --loop`, or `ipab janitor`) "
        f"removes their images and records {when}"
    )
    print(found_id)
    return 0


def cmd_janitor(args: argparse.Namespace) -> int:
    """Run the janitor: passes until nothing waits (or, with --loop, for ever under the fleet's lock)."""
    import threading

    from scheduler.cli.stopping import stop_on_signals
    from shared.janitor.loop import janitor_pass, run_janitor
    from shared.settings import load_settings
    from shared.storage import ObjectStore

    settings = load_settings()
    store = ObjectStore.from_settings(settings)
    client = _redis(settings)
    try:
        with database(settings) as sessions:
            clients: dict[str, Any] = {
                "sessions": sessions,
                "store": store,
                "redis_client": client,
                "settings": settings,
            }
            if args.loop:
                stop: threading.Event = stop_on_signals()
                run_janitor(**clients, stop=stop)
                return 0
            report = janitor_pass(**clients)
            totals = [report]
            while report.more:
                report = janitor_pass(**clients)
                totals.append(report)
    finally:
        client.close()
    print(
        f"janitor: {sum(r.jobs_removed for r in totals)} job(s) removed, {sum(r.rows_purged for r in totals)} "
        f"row(s) purged, {sum(r.batches_purged for r in totals)} batch(es) and "
        f"{sum(r.references_removed for r in totals)} image(s) removed; {sum(r.objects_deleted for r in totals)} "
        f"object(s), {sum(r.bytes_deleted for r in totals)} bytes deleted; lag {totals[-1].lag_s:.0f} s"
    )
    return 0


def cmd_tenants_list(args: argparse.Namespace) -> int:
    """Every tenant with its default retention (`fleet`: IPAB_RETENTION_OUTPUTS_S)."""
    from sqlalchemy import select

    from shared.db import Tenant
    from shared.jobs import transaction
    from shared.settings import load_settings

    settings = load_settings()
    with database(settings) as sessions, transaction(sessions) as session:
        tenants = session.execute(select(Tenant.name, Tenant.expires_after_s).order_by(Tenant.name)).all()
    print("\t".join(["tenant", "expires_after"]))
    fleet = format_duration(settings.retention_outputs_s)
    for name, seconds in tenants:
        print(f"{name}\t{format_duration(seconds) if seconds is not None else f'{fleet} (fleet)'}")
    return 0


def cmd_tenants_set(args: argparse.Namespace) -> int:
    """Set a tenant's default retention (`fleet`: back to IPAB_RETENTION_OUTPUTS_S)."""
    from scheduler.tenants import set_retention
    from shared.jobs import transaction
    from shared.settings import load_settings

    seconds = None if args.expires_after == "fleet" else expires_after_s(args.expires_after)
    with database(load_settings()) as sessions, transaction(sessions) as session:
        set_retention(session=session, tenant=args.name, expires_after_s=seconds)
    shown = "the fleet's (IPAB_RETENTION_OUTPUTS_S)" if seconds is None else format_duration(seconds)
    print(f"tenant {args.name}: images of jobs submitted from now on are kept {shown}")
    return 0


def cmd_tenants_delete(args: argparse.Namespace) -> int:
    """Delete a tenant and everything of it (`--purge` is required: nothing of it can be brought back)."""
    from scheduler.batches.deletion import purge_tenant
    from shared.settings import load_settings
    from shared.storage import ObjectStore

    if not args.purge:
        raise InvalidInput("--purge", None, "is required: it deletes every job, image, key and record of the tenant")
    settings = load_settings()
    client = _redis(settings)

    def waiting(seconds: float) -> None:
        print(f"jobs of {args.name} were running: waiting {seconds:.0f} s for their workers to stop", file=sys.stderr)

    try:
        with database(settings) as sessions:
            store = ObjectStore.from_settings(settings)
            report = purge_tenant(
                sessions=sessions,
                store=store,
                redis_client=client,
                settings=settings,
                tenant=args.name,
                on_wait=waiting,
            )
    finally:
        client.close()
    rows = ", ".join(f"{table} {n}" for table, n in sorted(report.rows.items()) if n)
    print(
        f"tenant {args.name} deleted: {report.batches} batch(es), {report.jobs} job(s), {report.images_removed} "
        f"image(s) removed ({report.images_kept} kept: other tenants use them); {report.objects_deleted} object(s), "
        f"{report.bytes_deleted} bytes deleted; rows: {rows or 'none'}"
    )
    return 0


def register(subparsers: Any) -> None:
    """Add `ipab delete`, `ipab janitor` and `ipab tenants`."""
    p = subparsers.add_parser("delete", help="delete a batch or a job: its images and records (the janitor does it)")
    p.add_argument("target", metavar="BATCH|JOB", help="batch name or id, or job id")
    p.set_defaults(func=cmd_delete)
    p = subparsers.add_parser("janitor", help="remove expired and deleted data now (once, or --loop)")
    p.add_argument(
        "--loop", action="store_true", help="keep going every IPAB_JANITOR_INTERVAL_S (one janitor works at a time)"
    )
    p.set_defaults(func=cmd_janitor)
    tenants = subparsers.add_parser("tenants", help="tenants: their retention; deleting one with all its data")
    sub = tenants.add_subparsers(dest="tenants_command", required=True, metavar="ACTION")
    sub.add_parser("list", help="every tenant with its default retention").set_defaults(func=cmd_tenants_list)
    setter = sub.add_parser("set", help="a tenant's default retention of its images")
    setter.add_argument("name", metavar="NAME")
    setter.add_argument(
        "--expires-after",
        required=True,
        type=lambda text: text if text == "fleet" else duration_arg(text),
        help="7d, 30d, 1y (1h to 3650d), never, or fleet (IPAB_RETENTION_OUTPUTS_S)",
    )
    setter.set_defaults(func=cmd_tenants_set)
    delete = sub.add_parser("delete", help="delete a tenant: every batch, job, image, key, record of it")
    delete.add_argument("name", metavar="NAME")
    delete.add_argument("--purge", action="store_true", help="required: nothing of the tenant can be brought back")
    delete.set_defaults(func=cmd_tenants_delete)
