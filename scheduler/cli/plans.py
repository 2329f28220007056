"""`ipab plans apply|list|show|history|run|pause|resume|delete` and `ipab beat`.

Times are shown in each plan's own time zone, ISO 8601 with the offset. Each command imports
what it runs when it runs: the parsers load no SQL, cron or S3 code.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from scheduler.cli.common import database
from scheduler.cli.stopping import stop_on_signals
from scheduler.plans.defaults import DEFAULT_INTERVAL_S, HISTORY_LIMIT
from shared.errors import InvalidInput

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

    from scheduler.plans.planfile import PlanSpec
    from scheduler.plans.runner import SlotContext, SlotOutcome

# ipab plans apply


def _read_all(paths: Sequence[str]) -> tuple[list[PlanSpec], list[str]]:
    """Every valid plan, and a `file: field: reason` line per problem of the others."""
    from scheduler.plans.planfile import PlanInvalid, read_plan_file
    from shared.settings import load_settings

    settings = load_settings()
    specs, problems = [], []
    for raw in paths:
        try:
            specs.append(read_plan_file(Path(raw), settings=settings))
        except PlanInvalid as e:
            problems += [f"{raw}: {field}: {reason}" for field, reason in e.problems]
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen:
            problems.append(f"{spec.source}: name: {spec.name!r} is also the name in {seen[spec.name]}; rename one")
        seen[spec.name] = spec.source
    return specs, problems


def cmd_apply(args: argparse.Namespace) -> int:
    """Create or update plans from files; every file is validated first, and any problem applies none."""
    from scheduler.plans import views
    from shared.db import utcnow
    from shared.settings import load_settings

    specs, problems = _read_all(args.files)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"{len(problems)} problem(s); no plan applied. Fix them and apply again", file=sys.stderr)
        return 2
    with database(load_settings()) as sessions:
        applied = views.apply_specs(sessions=sessions, specs=specs, now=utcnow())
    for plan in applied:
        state = " (paused)" if plan["state"] == "paused" else ""
        print(f"plan {plan['name']}: {plan['change']}{state}; next slot {plan['next_slot']}")
        for warning in plan["warnings"]:
            print(f"warning: plan {plan['name']}: {warning}", file=sys.stderr)
        if plan["webhook_secret"] is not None:
            print(f"webhook signing secret of new tenant {plan['tenant']} (shown once): {plan['webhook_secret']}")
    return 0


# ipab plans list / show / history

LIST_COLUMNS: Final = ("name", "state", "schedule", "timezone", "next_slot", "last_slot", "last_status", "last")
HISTORY_COLUMNS: Final = ("slot", "kind", "status", "batch", "jobs", "reason")


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return ", ".join(value) if isinstance(value, list) else str(value)


def cmd_list(args: argparse.Namespace) -> int:
    """Every plan: state, schedule, next slot (in its zone), last slot with its status and counts."""
    from scheduler.plans import views
    from shared.db import utcnow
    from shared.settings import load_settings

    with database(load_settings()) as sessions:
        plans = views.list_plans(sessions=sessions, now=utcnow())
    print("\t".join(LIST_COLUMNS))
    for plan in plans:
        print("\t".join(_cell(plan[column]) for column in LIST_COLUMNS))
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    """One plan's settings and its next slots."""
    from scheduler.plans import views
    from shared.db import utcnow
    from shared.settings import load_settings

    with database(load_settings()) as sessions:
        details = views.show_plan(sessions=sessions, name=args.name, now=utcnow())
    details["schedule"] = f"{details['schedule']} ({details.pop('timezone')})"
    print("\n".join(f"{key}: {_cell(value)}" for key, value in details.items()))
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """The plan's slots, newest first: when, kind, status, batch, counts, and why (skipped, failed, caught up)."""
    from scheduler.plans import views
    from shared.settings import load_settings

    with database(load_settings()) as sessions:
        slots = views.plan_history(sessions=sessions, name=args.name, limit=args.limit)
    print("\t".join(HISTORY_COLUMNS))
    for slot in slots:
        jobs = "-" if slot["counts"] is None else views.counts_text(slot["counts"])
        cells = [slot["slot"], slot["kind"], slot["status"], _cell(slot["batch"]), jobs, slot["reason"] or ""]
        print("\t".join(cells))
    return 0


# ipab plans run / pause / resume / delete


def _print_outcome(outcome: SlotOutcome) -> int:
    if outcome.status == "submitted":
        print(f"batch {outcome.batch_name}: {outcome.added} job(s) submitted")
        print(outcome.batch_id)
        return 0
    print(f"slot {outcome.batch_name}: {outcome.status}: {outcome.reason or 'decided already'}", file=sys.stderr)
    return 2


def cmd_run(args: argparse.Namespace) -> int:
    """An extra run now, as its own slot (`<plan>@<now>`); the batch id alone on the last line."""
    if not args.now:
        raise InvalidInput("--now", None, "is required: `ipab plans run NAME --now` runs the plan once, now")
    from scheduler.plans import views
    from scheduler.plans.runner import SlotContext
    from shared.db import utcnow
    from shared.settings import load_settings
    from shared.storage import ObjectStore

    settings = load_settings()
    ObjectStore.from_settings(settings).ensure_bucket()
    with database(settings) as sessions:
        outcome = views.run_now(SlotContext(settings=settings, sessions=sessions, now=utcnow), name=args.name)
    return _print_outcome(outcome)


def _set_enabled(name: str, enabled: bool) -> int:
    from scheduler.plans import views
    from shared.db import utcnow
    from shared.settings import load_settings

    with database(load_settings()) as sessions:
        changed = views.set_plan_enabled(sessions=sessions, name=name, enabled=enabled, now=utcnow())
    state = "resumed (slots after now run)" if enabled else "paused"
    print(f"plan {name}: {state if changed else 'already ' + ('enabled' if enabled else 'paused')}")
    return 0


def cmd_pause(args: argparse.Namespace) -> int:
    """Stop running the plan's slots (its history stays)."""
    return _set_enabled(args.name, False)


def cmd_resume(args: argparse.Namespace) -> int:
    """Run the plan's slots again, from now on (slots missed while paused are not caught up)."""
    return _set_enabled(args.name, True)


def cmd_delete(args: argparse.Namespace) -> int:
    """Delete the plan and its slot history; its batches and their jobs stay."""
    from scheduler.plans import views
    from shared.settings import load_settings

    with database(load_settings()) as sessions:
        slots = views.delete_named_plan(sessions=sessions, name=args.name)
    print(f"plan {args.name}: deleted with {slots} slot record(s); its batches stay")
    return 0


# ipab beat


def beat_context(sessions: sessionmaker[Session]) -> SlotContext:
    """The beat's context on the real clock."""
    from scheduler.plans.runner import SlotContext
    from shared.db import utcnow
    from shared.settings import load_settings

    return SlotContext(settings=load_settings(), sessions=sessions, now=utcnow)


def cmd_beat(args: argparse.Namespace) -> int:
    """Turn due slots into batches until interrupted; run as many replicas as you like."""
    stop = stop_on_signals()  # first: a SIGTERM during start-up must still end the beat cleanly
    from scheduler.plans.beat import run_beat
    from shared.settings import load_settings
    from shared.storage import ObjectStore

    settings = load_settings()
    ObjectStore.from_settings(settings).ensure_bucket()
    with database(settings) as sessions:
        run_beat(beat_context(sessions), interval_s=args.interval, stop=stop, passes=args.passes)
    return 0


def _plans_parser(subparsers: Any) -> dict[str, Any]:
    """`ipab plans ACTION`; the parsers of the actions that take a plan's NAME, by action."""
    plans = subparsers.add_parser("plans", help="nightly render plans: a manifest on a cron schedule")
    sub = plans.add_subparsers(dest="plans_command", required=True, metavar="ACTION")
    apply = sub.add_parser("apply", help="create or update plans from plan files (TOML); all or none")
    apply.add_argument("files", nargs="+", metavar="FILE")
    apply.set_defaults(func=cmd_apply)
    sub.add_parser("list", help="every plan: next slot, last slot and its counts").set_defaults(func=cmd_list)
    named: dict[str, Any] = {}
    for name, func, text in (
        ("show", cmd_show, "a plan's settings and next slots"),
        ("pause", cmd_pause, "stop running a plan's slots"),
        ("resume", cmd_resume, "run a plan's slots again, from now on"),
        ("delete", cmd_delete, "delete a plan and its slot history (its batches stay)"),
        ("history", cmd_history, "each slot: batch, counts, skipped or failed and why"),
        ("run", cmd_run, "an extra run now, as its own slot"),
    ):
        named[name] = p = sub.add_parser(name, help=text)
        p.add_argument("name", metavar="NAME")
        p.set_defaults(func=func)
    return named


def register(subparsers: Any) -> None:
    """Add `ipab plans ...` and `ipab beat` to the `ipab` parser."""
    named = _plans_parser(subparsers)
    named["history"].add_argument("--limit", type=int, default=HISTORY_LIMIT, help="newest slots shown")
    named["run"].add_argument("--now", action="store_true", help="run now (required)")
    beat = subparsers.add_parser("beat", help="turn due plan slots into batches (any number of replicas)")
    beat.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, help="seconds between passes")
    beat.add_argument("--passes", type=int, help="stop after this many passes (default: run until stopped)")
    beat.set_defaults(func=cmd_beat)
