"""`ipab plans apply|list|show|history|run|pause|resume|delete` and `ipab beat`.

Times are shown in each plan's own time zone, ISO 8601 with the offset.
"""

from __future__ import annotations

import argparse
import sys
import threading
from collections.abc import Sequence
from datetime import datetime
from pathlib import Path
from typing import Any, Final
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from scheduler.commands import database
from scheduler.plans import store
from scheduler.plans.beat import DEFAULT_INTERVAL_S, run_beat
from scheduler.plans.planfile import PlanInvalid, PlanSpec, read_plan_file
from scheduler.plans.runner import SlotContext, SlotOutcome, run_slot
from scheduler.plans.slots import local_iso, next_slot, slots_after
from shared.db import Batch, Plan, PlanSlot, utcnow
from shared.errors import InvalidInput
from shared.jobs import transaction
from shared.settings import load_settings
from shared.storage import ObjectStore

HISTORY_LIMIT: Final = 50
SHOW_NEXT_SLOTS: Final = 3


def counts_text(counts: dict[str, int]) -> str:
    """`3 jobs: succeeded 2, queued 1` (or `no jobs`)."""
    total = sum(counts.values())
    if not total:
        return "no jobs"
    return f"{total} jobs: " + ", ".join(f"{status} {n}" for status, n in sorted(counts.items()))


# ipab plans apply


def _read_all(paths: Sequence[str]) -> tuple[list[PlanSpec], list[str]]:
    """Every valid plan, and a `file: field: reason` line per problem of the others."""
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
    specs, problems = _read_all(args.files)
    if problems:
        print("\n".join(problems), file=sys.stderr)
        print(f"{len(problems)} problem(s); no plan applied. Fix them and apply again", file=sys.stderr)
        return 2
    now = utcnow()
    with database(load_settings()) as sessions, transaction(sessions) as session:
        changes = [(spec, store.apply_plan(session=session, spec=spec, now=now)) for spec in specs]
    for spec, change in changes:
        zone = ZoneInfo(spec.timezone)
        upcoming = local_iso(next_slot(spec.schedule, zone, now), zone)
        state = "" if spec.enabled else " (paused)"
        print(f"plan {spec.name}: {change}{state}; next slot {upcoming}")
    return 0


# ipab plans list / show / history


def _last_cells(session: Session, plan: Plan, last: PlanSlot | None) -> list[str]:
    if last is None:
        return ["-", "-", "-"]
    zone = ZoneInfo(plan.timezone)
    counts = store.batch_counts(session=session, batch_ids=[last.batch_id] if last.batch_id else [])
    detail = counts_text(counts.get(last.batch_id or "", {})) if last.batch_id else (last.reason or "")
    return [local_iso(last.slot_at, zone), last.status, detail]


def cmd_list(args: argparse.Namespace) -> int:
    """Every plan: state, schedule, next slot (in its zone), last slot with its status and counts."""
    now = utcnow()
    with database(load_settings()) as sessions, transaction(sessions) as session:
        plans = list(session.scalars(select(Plan).order_by(Plan.name)))
        latest = store.latest_slots(session=session)
        print("\t".join(["name", "state", "schedule", "timezone", "next_slot", "last_slot", "last_status", "last"]))
        for plan in plans:
            zone = ZoneInfo(plan.timezone)
            state = "enabled" if plan.enabled else "paused"
            upcoming = local_iso(next_slot(plan.schedule, zone, max(now, plan.schedule_from)), zone)
            cells = [plan.name, state, plan.schedule, plan.timezone, upcoming]
            print("\t".join(cells + _last_cells(session, plan, latest.get(plan.id))))
    return 0


def _show_lines(plan: Plan) -> list[str]:
    zone = ZoneInfo(plan.timezone)
    after = max(utcnow(), plan.schedule_from)
    upcoming = slots_after(plan.schedule, zone, after, datetime.max, limit=SHOW_NEXT_SLOTS)
    fields = {
        "name": plan.name,
        "state": "enabled" if plan.enabled else "paused",
        "schedule": f"{plan.schedule} ({plan.timezone})",
        "manifest": plan.manifest,
        "model_set": plan.model_set,
        "tenant": plan.tenant,
        "lane": plan.lane,
        "set": plan.defaults,
        "catch_up": plan.catch_up,
        "overlap": plan.overlap,
        "webhook": plan.webhook_url or "-",
        "source": plan.source,
        "next_slots": ", ".join(local_iso(slot, zone) for slot in upcoming),
    }
    return [f"{key}: {value}" for key, value in fields.items()]


def cmd_show(args: argparse.Namespace) -> int:
    """One plan's settings and its next slots."""
    with database(load_settings()) as sessions, transaction(sessions) as session:
        plan = store.find_plan(session=session, name=args.name)
    print("\n".join(_show_lines(plan)))
    return 0


def cmd_history(args: argparse.Namespace) -> int:
    """The plan's slots, newest first: when, kind, status, batch, counts, and why (skipped, failed, caught up)."""
    with database(load_settings()) as sessions, transaction(sessions) as session:
        plan = store.find_plan(session=session, name=args.name)
        slots = store.plan_slots(session=session, plan_id=plan.id, limit=args.limit)
        batch_ids = [s.batch_id for s in slots if s.batch_id]
        counts = store.batch_counts(session=session, batch_ids=batch_ids)
        names = dict(session.execute(select(Batch.id, Batch.name).where(Batch.id.in_(batch_ids))).tuples().all())
    zone = ZoneInfo(plan.timezone)
    print("\t".join(["slot", "kind", "status", "batch", "jobs", "reason"]))
    for slot in slots:
        batch = names.get(slot.batch_id or "", "-")
        jobs = counts_text(counts.get(slot.batch_id or "", {})) if slot.batch_id else "-"
        print("\t".join([local_iso(slot.slot_at, zone), slot.kind, slot.status, batch, jobs, slot.reason or ""]))
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
    settings = load_settings()
    ObjectStore.from_settings(settings).ensure_bucket()
    with database(settings) as sessions:
        with transaction(sessions) as session:
            plan = store.find_plan(session=session, name=args.name)
        ctx = SlotContext(settings=settings, sessions=sessions, now=utcnow)
        outcome = run_slot(ctx, plan, utcnow(), kind=store.MANUAL)
    return _print_outcome(outcome)


def _set_enabled(name: str, enabled: bool) -> int:
    with database(load_settings()) as sessions, transaction(sessions) as session:
        plan = store.find_plan(session=session, name=name)
        changed = store.set_enabled(plan=plan, enabled=enabled, now=utcnow())
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
    with database(load_settings()) as sessions, transaction(sessions) as session:
        plan = store.find_plan(session=session, name=args.name)
        slots = store.delete_plan(session=session, plan=plan)
    print(f"plan {args.name}: deleted with {slots} slot record(s); its batches stay")
    return 0


# ipab beat


def beat_context(sessions: sessionmaker[Session]) -> SlotContext:
    """The beat's context on the real clock."""
    return SlotContext(settings=load_settings(), sessions=sessions, now=utcnow)


def cmd_beat(args: argparse.Namespace) -> int:
    """Turn due slots into batches until interrupted; run as many replicas as you like."""
    settings = load_settings()
    ObjectStore.from_settings(settings).ensure_bucket()
    with database(settings) as sessions:
        run_beat(beat_context(sessions), interval_s=args.interval, stop=threading.Event(), passes=args.passes)
    return 0


def _plans_parser(subparsers: Any) -> Any:
    plans = subparsers.add_parser("plans", help="nightly render plans: a manifest on a cron schedule")
    sub = plans.add_subparsers(dest="plans_command", required=True, metavar="ACTION")
    apply = sub.add_parser("apply", help="create or update plans from plan files (TOML); all or none")
    apply.add_argument("files", nargs="+", metavar="FILE")
    apply.set_defaults(func=cmd_apply)
    sub.add_parser("list", help="every plan: next slot, last slot and its counts").set_defaults(func=cmd_list)
    for name, func, text in (
        ("show", cmd_show, "a plan's settings and next slots"),
        ("pause", cmd_pause, "stop running a plan's slots"),
        ("resume", cmd_resume, "run a plan's slots again, from now on"),
        ("delete", cmd_delete, "delete a plan and its slot history (its batches stay)"),
    ):
        p = sub.add_parser(name, help=text)
        p.add_argument("name", metavar="NAME")
        p.set_defaults(func=func)
    return sub


def register(subparsers: Any) -> None:
    """Add `ipab plans ...` and `ipab beat` to the `ipab` parser."""
    sub = _plans_parser(subparsers)
    history = sub.add_parser("history", help="each slot: batch, counts, skipped or failed and why")
    history.add_argument("name", metavar="NAME")
    history.add_argument("--limit", type=int, default=HISTORY_LIMIT, help="newest slots shown")
    history.set_defaults(func=cmd_history)
    run = sub.add_parser("run", help="an extra run now, as its own slot")
    run.add_argument("name", metavar="NAME")
    run.add_argument("--now", action="store_true", help="run now (required)")
    run.set_defaults(func=cmd_run)
    beat = subparsers.add_parser("beat", help="turn due plan slots into batches (any number of replicas)")
    beat.add_argument("--interval", type=float, default=DEFAULT_INTERVAL_S, help="seconds between passes")
    beat.add_argument("--passes", type=int, help="stop after this many passes (default: run until stopped)")
    beat.set_defaults(func=cmd_beat)
