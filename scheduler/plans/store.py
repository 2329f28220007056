"""Plans and their slot rows in SQL: small keyword-only functions on a caller's session.

A slot row is written with INSERT ... ON CONFLICT DO NOTHING on the unique (plan, slot
time): whoever inserts first decides the slot, and everybody else learns it from the
row count. Every datetime is naive UTC.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime
from typing import Any, Final

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session

from scheduler.plans.planfile import PlanSpec, defaults_json
from shared.db import Plan, PlanSlot, insert_ignoring_duplicates, new_id
from shared.errors import InvalidInput

SCHEDULED: Final = "scheduled"  # a slot of the cron schedule
MANUAL: Final = "manual"  # `ipab plans run NAME --now`
# The columns that `ipab plans apply` sets from the file.
_SPEC_COLUMNS: Final = (
    *("schedule", "timezone", "manifest", "model_set", "model_set_file", "tenant", "lane"),
    *("catch_up", "overlap", "webhook_url", "enabled", "source"),
)


def _changed(result: Any) -> int:
    """Rows a statement inserted or deleted (SQLAlchemy types `rowcount` loosely)."""
    return int(getattr(result, "rowcount", 0) or 0)


def this_process() -> str:
    """`host:pid`, recorded on the slots this process decides."""
    return f"{socket.gethostname()}:{os.getpid()}"


def find_plan(*, session: Session, name: str) -> Plan:
    """The plan named `name`; `InvalidInput` naming NAME otherwise."""
    plan = session.scalars(select(Plan).where(Plan.name == name)).one_or_none()
    if plan is None:
        raise InvalidInput("NAME", name, "no plan has this name; `ipab plans list` lists them")
    return plan


def apply_plan(*, session: Session, spec: PlanSpec, now: datetime) -> str:
    """Create or update the plan of `spec`; returns `created`, `updated` or `unchanged`.

    Only slots after the plan's `schedule_from` are due: it is `now` for a new plan, and
    moves to `now` when the schedule or time zone changes or the file enables a paused
    plan, so neither an old schedule's slots nor a paused stretch are caught up.
    """
    values = {c: getattr(spec, c) for c in _SPEC_COLUMNS} | {"defaults": defaults_json(spec)}
    plan = session.scalars(select(Plan).where(Plan.name == spec.name)).one_or_none()
    if plan is None:
        session.add(Plan(id=new_id(), name=spec.name, **values, schedule_from=now, created_at=now, updated_at=now))
        return "created"
    changed = {column: value for column, value in values.items() if getattr(plan, column) != value}
    if not changed:
        return "unchanged"
    if {"schedule", "timezone"} & changed.keys() or changed.get("enabled") is True:
        plan.schedule_from = now
    for column, value in changed.items():
        setattr(plan, column, value)
    plan.updated_at = now
    return "updated"


def set_enabled(*, plan: Plan, enabled: bool, now: datetime) -> bool:
    """Pause or resume; a resumed plan runs the slots after `now` only. Returns whether it changed."""
    if plan.enabled == enabled:
        return False
    plan.enabled = enabled
    plan.updated_at = now
    if enabled:
        plan.schedule_from = now
    return True


def delete_plan(*, session: Session, plan: Plan) -> int:
    """Delete the plan and its slot history (its batches stay); returns how many slot rows went."""
    result = session.execute(delete(PlanSlot).where(PlanSlot.plan_id == plan.id))
    session.delete(plan)
    return _changed(result)


def enabled_plans(*, session: Session) -> list[Plan]:
    """Every enabled plan, by name."""
    return list(session.scalars(select(Plan).where(Plan.enabled.is_(True)).order_by(Plan.name)))


def last_scheduled_slots(*, session: Session) -> dict[str, datetime]:
    """The latest decided scheduled slot of each plan (manual runs do not count)."""
    stmt = select(PlanSlot.plan_id, func.max(PlanSlot.slot_at)).where(PlanSlot.kind == SCHEDULED)
    return dict(session.execute(stmt.group_by(PlanSlot.plan_id)).tuples().all())


def slot_decided(*, session: Session, plan_id: str, slot_at: datetime) -> bool:
    """Whether a row for this slot exists (another beat, or this one before a restart, decided it)."""
    stmt = select(PlanSlot.id).where(PlanSlot.plan_id == plan_id, PlanSlot.slot_at == slot_at)
    return session.scalars(stmt).first() is not None


def record_slot(
    *,
    session: Session,
    plan_id: str,
    slot_at: datetime,
    kind: str,
    status: str,
    decided_at: datetime,
    batch_id: str | None = None,
    reason: str | None = None,
) -> bool:
    """Insert the slot's row unless one exists; returns whether this call inserted it."""
    dialect = session.get_bind().dialect.name
    stmt = insert_ignoring_duplicates(PlanSlot, dialect=dialect, unique=["plan_id", "slot_at"])
    row = {"id": new_id(), "plan_id": plan_id, "slot_at": slot_at, "kind": kind, "status": status}
    extra = {"batch_id": batch_id, "reason": reason, "decided_at": decided_at, "decided_by": this_process()}
    # RETURNING, not rowcount: an ORM-enabled INSERT's result does not always carry a rowcount.
    return session.execute(stmt.values(**row, **extra).returning(PlanSlot.id)).first() is not None


def previous_batch(*, session: Session, plan_id: str, before: datetime) -> str | None:
    """The batch of the plan's latest slot before `before` that made one."""
    stmt = (
        select(PlanSlot.batch_id)
        .where(PlanSlot.plan_id == plan_id, PlanSlot.slot_at < before, PlanSlot.batch_id.is_not(None))
        .order_by(PlanSlot.slot_at.desc())
        .limit(1)
    )
    return session.scalars(stmt).first()


def plan_slots(*, session: Session, plan_id: str, limit: int) -> list[PlanSlot]:
    """The plan's latest slots, newest first."""
    stmt = select(PlanSlot).where(PlanSlot.plan_id == plan_id).order_by(PlanSlot.slot_at.desc()).limit(limit)
    return list(session.scalars(stmt))


def latest_slots(*, session: Session) -> dict[str, PlanSlot]:
    """The newest slot row of each plan."""
    newest = select(PlanSlot.plan_id, func.max(PlanSlot.slot_at).label("at")).group_by(PlanSlot.plan_id).subquery()
    stmt = select(PlanSlot).join(newest, (PlanSlot.plan_id == newest.c.plan_id) & (PlanSlot.slot_at == newest.c.at))
    return {slot.plan_id: slot for slot in session.scalars(stmt)}
