"""What `ipab plans ...` and `/v1/plans` show and do, once for both: plain values, no printing.

Times are shown in each plan's own time zone, ISO 8601 with the offset. The CLI prints
these values as tab-separated lines; the API returns them as JSON.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any, Final
from zoneinfo import ZoneInfo

from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from scheduler.batches.counts import count_batch, count_jobs
from scheduler.plans import store
from scheduler.plans.defaults import HISTORY_LIMIT
from scheduler.plans.planfile import PlanSpec
from scheduler.plans.runner import SlotContext, SlotOutcome, run_slot
from scheduler.plans.slots import local_iso, next_slot, slots_after
from scheduler.tenants import ensure_tenant
from shared.db import Batch, Plan, PlanSlot
from shared.jobs import transaction

SHOW_NEXT_SLOTS: Final = 3


def counts_text(counts: dict[str, int]) -> str:
    """`3 jobs: succeeded 2, queued 1` (or `no jobs`)."""
    total = sum(counts.values())
    if not total:
        return "no jobs"
    return f"{total} jobs: " + ", ".join(f"{status} {n}" for status, n in sorted(counts.items()))


def _state(plan: Plan) -> str:
    return "enabled" if plan.enabled else "paused"


def apply_specs(*, sessions: sessionmaker[Session], specs: Sequence[PlanSpec], now: datetime) -> list[dict[str, Any]]:
    """Create or update every plan in one transaction; per plan: name, change, state, next slot, tenant, warnings.

    A plan's tenant is created with it if new, so that its webhooks have a secret to be signed
    with; that secret is in `webhook_secret` (shown once: None once the tenant exists).
    """
    with transaction(sessions) as session:
        secrets: dict[str, str | None] = {}
        for spec in specs:
            if spec.tenant not in secrets:
                secrets[spec.tenant] = ensure_tenant(session=session, name=spec.tenant)
        changes = [(spec, store.apply_plan(session=session, spec=spec, now=now)) for spec in specs]
    applied = []
    for spec, change in changes:
        zone = ZoneInfo(spec.timezone)
        upcoming = local_iso(next_slot(spec.schedule, zone, now), zone)
        state = "enabled" if spec.enabled else "paused"
        applied.append(
            {
                "name": spec.name,
                "change": change,
                "state": state,
                "next_slot": upcoming,
                "tenant": spec.tenant,
                "webhook_secret": secrets[spec.tenant],
                "warnings": list(spec.warnings),
            }
        )
    return applied


def _last(session: Session, plan: Plan, last: PlanSlot | None) -> dict[str, Any]:
    """The plan's newest slot: when, its status, and its batch's counts (or the reason it made none)."""
    if last is None:
        return {"last_slot": None, "last_status": None, "last": None, "last_counts": None}
    batch_counts = count_batch(session=session, batch_id=last.batch_id).present() if last.batch_id else None
    detail = counts_text(batch_counts) if batch_counts is not None else (last.reason or "")
    slot = local_iso(last.slot_at, ZoneInfo(plan.timezone))
    return {"last_slot": slot, "last_status": last.status, "last": detail, "last_counts": batch_counts}


def list_plans(*, sessions: sessionmaker[Session], now: datetime) -> list[dict[str, Any]]:
    """Every plan by name: state, schedule, next slot (in its zone), newest slot with its status and counts."""
    with transaction(sessions) as session:
        plans = list(session.scalars(select(Plan).order_by(Plan.name)))
        latest = store.latest_slots(session=session)
        rows = []
        for plan in plans:
            zone = ZoneInfo(plan.timezone)
            upcoming = local_iso(next_slot(plan.schedule, zone, max(now, plan.schedule_from)), zone)
            row = {"name": plan.name, "state": _state(plan), "schedule": plan.schedule, "timezone": plan.timezone}
            rows.append(row | {"next_slot": upcoming} | _last(session, plan, latest.get(plan.id)))
        return rows


def plan_details(plan: Plan, *, now: datetime) -> dict[str, Any]:
    """One plan's settings and its next SHOW_NEXT_SLOTS slots."""
    zone = ZoneInfo(plan.timezone)
    upcoming = slots_after(plan.schedule, zone, max(now, plan.schedule_from), datetime.max, limit=SHOW_NEXT_SLOTS)
    return {
        "name": plan.name,
        "state": _state(plan),
        "schedule": plan.schedule,
        "timezone": plan.timezone,
        "manifest": plan.manifest,
        "model_set": plan.model_set,
        "model_set_file": plan.model_set_file,
        "tenant": plan.tenant,
        "lane": plan.lane,
        "set": json.loads(plan.defaults),
        "catch_up": plan.catch_up,
        "overlap": plan.overlap,
        "webhook": plan.webhook_url,
        "source": plan.source,
        "next_slots": [local_iso(slot, zone) for slot in upcoming],
    }


def show_plan(*, sessions: sessionmaker[Session], name: str, now: datetime) -> dict[str, Any]:
    """`plan_details` of the plan named `name`; `InvalidInput` naming NAME when there is none."""
    with transaction(sessions) as session:
        return plan_details(store.find_plan(session=session, name=name), now=now)


def plan_history(*, sessions: sessionmaker[Session], name: str, limit: int = HISTORY_LIMIT) -> list[dict[str, Any]]:
    """The plan's slots, newest first: when, kind, status, batch, counts, and why (skipped, failed, caught up)."""
    with transaction(sessions) as session:
        plan = store.find_plan(session=session, name=name)
        slots = store.plan_slots(session=session, plan_id=plan.id, limit=limit)
        batch_ids = [s.batch_id for s in slots if s.batch_id]
        tallies = count_jobs(session=session, batch_ids=batch_ids)
        names = dict(session.execute(select(Batch.id, Batch.name).where(Batch.id.in_(batch_ids))).tuples().all())
    zone = ZoneInfo(plan.timezone)
    return [
        {
            "slot": local_iso(slot.slot_at, zone),
            "kind": slot.kind,
            "status": slot.status,
            "batch_id": slot.batch_id,
            "batch": names.get(slot.batch_id) if slot.batch_id else None,
            "counts": tallies[slot.batch_id].present() if slot.batch_id else None,
            "reason": slot.reason,
        }
        for slot in slots
    ]


def run_now(ctx: SlotContext, *, name: str) -> SlotOutcome:
    """An extra run of the plan now, as its own manual slot (`<plan>@<now>`)."""
    with transaction(ctx.sessions) as session:
        plan = store.find_plan(session=session, name=name)
    return run_slot(ctx, plan, ctx.now(), kind=store.MANUAL)


def set_plan_enabled(*, sessions: sessionmaker[Session], name: str, enabled: bool, now: datetime) -> bool:
    """Pause or resume the plan named `name`; returns whether its state changed."""
    with transaction(sessions) as session:
        plan = store.find_plan(session=session, name=name)
        return store.set_enabled(plan=plan, enabled=enabled, now=now)


def delete_named_plan(*, sessions: sessionmaker[Session], name: str) -> int:
    """Delete the plan named `name` and its slot history (its batches stay); returns how many slot rows went."""
    with transaction(sessions) as session:
        plan = store.find_plan(session=session, name=name)
        return store.delete_plan(session=session, plan=plan)
