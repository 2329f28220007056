"""`ipab beat`: each pass finds the due slots of every enabled plan and decides them.

Any number of beats may run, on any hosts: each decides a slot only by inserting its
unique row (`scheduler.plans.runner`), so racing beats make one batch per slot. A beat
keeps no state of its own; what is due follows from SQL and the clock:

- only slots after the plan's `schedule_from` (creation, resume, a new schedule) and
  after its latest decided scheduled slot are due;
- `catch_up = latest` (default): after downtime, only the most recent missed slot runs
  (its row notes how many earlier ones did not); `all`: every missed slot, oldest first,
  up to MAX_CATCH_UP_SLOTS per pass; `none`: the most recent slot runs only if it is at
  most ON_TIME_S late, otherwise it is recorded as skipped.

The clock is a parameter (`now`), so tests drive simulated days through real processes.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime
from typing import Final
from zoneinfo import ZoneInfo

from scheduler.plans import store
from scheduler.plans.runner import SlotContext, SlotOutcome, record_missed, run_slot
from scheduler.plans.slots import latest_slot, slots_after
from shared.db import Plan
from shared.errors import TransientError
from shared.jobs import transaction

log = logging.getLogger(__name__)
# catch_up = none: a slot this late still runs (a beat restarting, a slow pass); later, skipped.
ON_TIME_S: Final = 300.0
MAX_CATCH_UP_SLOTS: Final = 1000


@dataclass(frozen=True)
class Due:
    """A slot to decide now: run it (with an optional note), or record it skipped for `skip_reason`."""

    slot_at: datetime
    note: str | None = None
    skip_reason: str | None = None


def due_slots(plan: Plan, *, last_scheduled: datetime | None, now: datetime) -> list[Due]:
    """The slots of `plan` to decide at `now`, oldest first, by its `catch_up`."""
    zone = ZoneInfo(plan.timezone)
    after = max(plan.schedule_from, last_scheduled) if last_scheduled is not None else plan.schedule_from
    if plan.catch_up == "all":
        return [Due(slot) for slot in slots_after(plan.schedule, zone, after, now, limit=MAX_CATCH_UP_SLOTS)]
    latest = latest_slot(plan.schedule, zone, now)
    if latest <= after:
        return []
    missed = len(slots_after(plan.schedule, zone, after, latest, limit=MAX_CATCH_UP_SLOTS)) - 1
    note = f"{missed} earlier missed slot(s) not run (catch_up = {plan.catch_up})" if missed else None
    late_s = (now - latest).total_seconds()
    if plan.catch_up == "none" and late_s > ON_TIME_S:
        reason = f"missed by {late_s:.0f} s (no beat was running); catch_up = none runs no missed slot"
        return [Due(latest, skip_reason=reason)]
    return [Due(latest, note=note)]


def _decide(ctx: SlotContext, plan: Plan, due: Due) -> SlotOutcome:
    if due.skip_reason is not None:
        return record_missed(ctx, plan, due.slot_at, reason=due.skip_reason)
    return run_slot(ctx, plan, due.slot_at, note=due.note)


def _log(plan: Plan, outcome: SlotOutcome) -> None:
    if outcome.status == "submitted":
        log.info("plan %s: batch %s, %d job(s)", plan.name, outcome.batch_name, outcome.added)
    elif outcome.status != "taken":
        log.warning("plan %s: slot %s %s: %s", plan.name, outcome.batch_name, outcome.status, outcome.reason)


def _plan_pass(ctx: SlotContext, plan: Plan, *, last_scheduled: datetime | None, now: datetime) -> list[SlotOutcome]:
    """Decide the plan's due slots in order; a transient error leaves the rest due for the next pass."""
    outcomes = []
    for due in due_slots(plan, last_scheduled=last_scheduled, now=now):
        try:
            outcome = _decide(ctx, plan, due)
        except TransientError as e:
            log.warning("plan %s: slot at %s not decided yet (%s); trying again next pass", plan.name, due.slot_at, e)
            break
        _log(plan, outcome)
        outcomes.append(outcome)
    return outcomes


def beat_pass(ctx: SlotContext) -> list[SlotOutcome]:
    """One pass over every enabled plan; returns what became of the slots it decided or found taken."""
    now = ctx.now()
    with transaction(ctx.sessions) as session:
        plans = store.enabled_plans(session=session)
        last = store.last_scheduled_slots(session=session)
    outcomes: list[SlotOutcome] = []
    for plan in plans:
        try:
            outcomes += _plan_pass(ctx, plan, last_scheduled=last.get(plan.id), now=now)
        except Exception:  # one broken plan must not stop the others
            log.exception("plan %s: pass failed; trying again next pass", plan.name)
    return outcomes


def run_beat(ctx: SlotContext, *, interval_s: float, stop: threading.Event, passes: int | None = None) -> None:
    """Pass after pass, `interval_s` apart, until `stop` is set (or after `passes` passes)."""
    done = 0
    while not stop.is_set() and (passes is None or done < passes):
        try:
            beat_pass(ctx)
        except TransientError as e:
            log.warning("beat pass failed (%s); trying again in %.1f s", e, interval_s)
        done += 1
        if passes is None or done < passes:
            stop.wait(interval_s)
