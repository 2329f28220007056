"""`ipab usage` (what tenants used) and `ipab quotas set|show|clear` (their limits).

Parsing and printing only: the report and the quotas are `scheduler.usage`'s. Light at
import: each command loads the database code when it runs.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from datetime import date
from typing import Any, Final

from scheduler.cli.common import database
from shared.errors import InvalidInput

GROUPS: Final = ("day", "batch", "lane", "model_set")  # scheduler.usage.report.GROUPS, without loading it
# Command-line flag -> quota (scheduler.usage.quotas.QUOTAS).
QUOTA_FLAGS: Final = {
    "images_per_day": "--images-per-day",
    "images_per_month": "--images-per-month",
    "gpu_s_per_day": "--gpu-seconds-per-day",
    "gpu_s_per_month": "--gpu-seconds-per-month",
    "max_running": "--max-running",
}
NO_LIMIT: Final = "none"
TABLE_FIGURES: Final = ("jobs", "images", "gpu_seconds", "lost_gpu_seconds", "pixel_steps")


def _day(flag: str) -> Any:
    def parse(text: str) -> date:
        try:
            return date.fromisoformat(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag} must be a UTC day as YYYY-MM-DD, e.g. 2026-12-01, not {text!r}"
            ) from None

    return parse


def _limit(flag: str, *, whole: bool) -> Any:
    def parse(text: str) -> int | float | None:
        if text.lower() == NO_LIMIT:
            return None
        kind = "a whole number" if whole else "a number of seconds"
        try:
            value = int(text) if whole else float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{flag} must be {kind} or `{NO_LIMIT}` (no limit), not {text!r}"
            ) from None
        if not math.isfinite(value):  # float() reads inf and nan
            raise argparse.ArgumentTypeError(f"{flag} must be {kind} or `{NO_LIMIT}` (no limit), not {text!r}")
        if value < 0:
            raise argparse.ArgumentTypeError(f"{flag} must be 0 or more, or `{NO_LIMIT}` (no limit), not {text!r}")
        return value

    return parse


def cmd_usage(args: argparse.Namespace) -> int:
    """Usage per day, batch, lane or model set, from the rollup: a table, JSON or CSV. Every row,
    streamed from the database PAGE_ROWS at a time (a report by batch has a row per batch ever run)."""
    from scheduler.usage.report import (
        UsageQuery,
        check_range,
        report_rows,
        row_json,
        usage_totals,
        write_csv,
        write_json,
    )
    from shared.jobs import transaction
    from shared.settings import load_settings

    check_range(args.since, args.until, names=("--since", "--until"))
    query = UsageQuery(tenant=args.tenant, since=args.since, until=args.until, by=args.by)
    with database(load_settings()) as sessions, transaction(sessions) as session:
        rows = report_rows(session=session, query=query)
        if args.csv:
            write_csv(sys.stdout, by=args.by, rows=rows)
            return 0
        if args.json:
            write_json(sys.stdout, query=query, rows=rows, totals=usage_totals(session=session, query=query))
            return 0
        columns = ["tenant", args.by, *TABLE_FIGURES]
        print("\t".join(columns))
        for row in rows:
            shown = row_json(row, args.by)
            print("\t".join(str(shown[c]) for c in columns))
        for tenant, totals in usage_totals(session=session, query=query).items():
            print("\t".join([tenant, "total", *(str(totals[c]) for c in TABLE_FIGURES)]))
    return 0


def cmd_quotas_set(args: argparse.Namespace) -> int:
    """Set some of a tenant's limits (`none` lifts one), keeping the others."""
    from scheduler.usage.quotas import set_quotas
    from shared.jobs import transaction
    from shared.settings import load_settings

    changes = {name: getattr(args, name) for name in QUOTA_FLAGS if getattr(args, name) is not _UNSET}
    if not changes:
        raise InvalidInput("quotas set", "", f"name at least one limit: {', '.join(QUOTA_FLAGS.values())}")
    with database(load_settings()) as sessions, transaction(sessions) as session:
        quotas = set_quotas(session=session, tenant=args.tenant, changes=changes)
    print(f"quotas of {args.tenant}: {_shown(quotas.to_json())}")
    return 0


def cmd_quotas_show(args: argparse.Namespace) -> int:
    """Each tenant's limits with what is used and when each resets (one tenant with --tenant)."""
    from scheduler.usage.quotas import quota_status
    from shared.jobs import transaction
    from shared.settings import load_settings

    with database(load_settings()) as sessions, transaction(sessions) as session:
        status = quota_status(session=session, tenant=args.tenant)
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    print("\t".join(["tenant", "quota", "limit", "used", "resets_at"]))
    for tenant, quotas in status.items():
        for name, state in quotas.items():
            if state["limit"] is not None:
                cells = [tenant, name, state["limit"], state["used"], state["resets_at"] or ""]
                print("\t".join(str(c) for c in cells))
    return 0


def cmd_quotas_clear(args: argparse.Namespace) -> int:
    """Lift every limit of a tenant."""
    from scheduler.usage.quotas import clear_quotas
    from shared.jobs import transaction
    from shared.settings import load_settings

    with database(load_settings()) as sessions, transaction(sessions) as session:
        cleared = clear_quotas(session=session, tenant=args.tenant)
    print(f"quotas of {args.tenant}: {'cleared' if cleared else 'there were none'}")
    return 0


def _shown(limits: dict[str, Any]) -> str:
    return ", ".join(f"{name}={NO_LIMIT if value is None else value}" for name, value in limits.items())


class _Unset:
    """A flag not given (None means `none`: lift the limit)."""


_UNSET: Final = _Unset()


def register(subparsers: Any) -> None:
    """Add `ipab usage` and `ipab quotas`."""
    usage = subparsers.add_parser("usage", help="what tenants used (GPU-seconds, images), per day, batch, lane")
    usage.add_argument("--tenant", help="one tenant (default: every tenant)")
    usage.add_argument("--since", type=_day("--since"), metavar="YYYY-MM-DD", help="first UTC day (included)")
    usage.add_argument("--until", type=_day("--until"), metavar="YYYY-MM-DD", help="last UTC day (included)")
    usage.add_argument("--by", choices=GROUPS, default="day", help="a row per day (default), batch, lane or model set")
    form = usage.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="the report as JSON (rows and totals)")
    form.add_argument("--csv", action="store_true", help="the rows as CSV with a header line")
    usage.set_defaults(func=cmd_usage)

    quotas = subparsers.add_parser("quotas", help="tenants' limits: images, GPU-seconds, jobs at once")
    sub = quotas.add_subparsers(dest="quotas_command", required=True, metavar="ACTION")
    set_ = sub.add_parser("set", help="set some of a tenant's limits (`none` lifts one)")
    set_.add_argument("--tenant", required=True)
    for name, flag in QUOTA_FLAGS.items():
        whole = not name.startswith("gpu_s")
        what = "images" if name.startswith("images") else "GPU-seconds" if not whole else "jobs running at once"
        set_.add_argument(flag, dest=name, type=_limit(flag, whole=whole), default=_UNSET, metavar="N", help=what)
    set_.set_defaults(func=cmd_quotas_set)
    show = sub.add_parser("show", help="limits, what is used and when each resets")
    show.add_argument("--tenant", help="one tenant (default: every tenant with quotas)")
    show.add_argument("--json", action="store_true", help="as JSON")
    show.set_defaults(func=cmd_quotas_show)
    clear = sub.add_parser("clear", help="lift every limit of a tenant")
    clear.add_argument("--tenant", required=True)
    clear.set_defaults(func=cmd_quotas_clear)
