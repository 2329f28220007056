"""One slot of a plan into one batch, or into a skipped or failed slot row that says why.

Exactly once per (plan, slot): the slot row is inserted in the same transaction as the
batch and its jobs (submit's `after_insert` hook), on a unique (plan_id, slot_at). A
second beat deciding the same slot at the same time finds the row there and rolls its
whole transaction back (`SlotTaken`), so it adds no batch and no job. The batch is named
`<plan>@<slot time in the plan's zone, ISO 8601 with offset>`.

What is a slot failure and what is retried: a manifest that is missing or invalid at slot
time (bad rows, rows past the limits of the set toml the plan named, that toml gone or now
naming another set, a model set that changed) is recorded as failed with the reason, and the
next slot runs as usual. A slot whose jobs would pass its tenant's quota
(`scheduler.usage.quotas`) is recorded as skipped, with the quota, what is used and when it
resets. A service that is down (SQL, S3) raises a transient error and nothing is recorded,
so the next beat pass tries the slot again.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final
from zoneinfo import ZoneInfo

from sqlalchemy.orm import Session, sessionmaker

from scheduler.batches.counts import count_batch
from scheduler.batches.events import BATCH_COMPLETED
from scheduler.plans import store
from scheduler.plans.manifests import read_plan_rows
from scheduler.plans.planfile import reads_local_files
from scheduler.plans.slots import local_iso
from scheduler.submission.submit import AfterInsert, RowOptions, submit_rows
from scheduler.webhooks.subscriptions import subscribe
from shared.db import Batch, Plan, PlanSlotStatus
from shared.errors import ManifestInvalid, PermanentError, QuotaExceeded
from shared.jobs import transaction
from shared.settings import Settings

TAKEN: Final = "taken"  # another beat decided the slot
MAX_REASON_PROBLEMS: Final = 3


class SlotTaken(Exception):
    """Raised inside the batch's transaction when the slot row exists already; rolls the transaction back."""


@dataclass(frozen=True)
class SlotContext:
    """What running slots needs: settings, sessions, and the clock (naive UTC; tests pass their own)."""

    settings: Settings
    sessions: sessionmaker[Session]
    now: Callable[[], datetime]


@dataclass(frozen=True)
class SlotOutcome:
    """What became of one slot: `submitted`, `skipped`, `failed`, or `taken` (decided elsewhere)."""

    status: str
    batch_name: str
    batch_id: str | None = None
    reason: str | None = None
    added: int = 0


def batch_name(plan: Plan, slot_at: datetime) -> str:
    """`<plan>@<slot time in the plan's zone, ISO 8601 with offset>`, e.g. `nightly@2026-03-29T03:00:00+02:00`."""
    return f"{plan.name}@{local_iso(slot_at, ZoneInfo(plan.timezone))}"


def _problems_text(problems: list[tuple[int, str, str]]) -> str:
    shown = "; ".join(f"line {line}: {field}: {reason}" for line, field, reason in problems[:MAX_REASON_PROBLEMS])
    more = len(problems) - MAX_REASON_PROBLEMS
    return f"invalid manifest: {shown}" + (f"; and {more} more problem(s)" if more > 0 else "")


def _record(ctx: SlotContext, plan: Plan, slot_at: datetime, *, kind: str, status: str, reason: str) -> SlotOutcome:
    """A slot that made no batch: its row, unless another beat decided the slot first."""
    with transaction(ctx.sessions) as session:
        inserted = store.record_slot(
            session=session,
            plan_id=plan.id,
            slot_at=slot_at,
            kind=kind,
            status=status,
            reason=reason,
            decided_at=ctx.now(),
        )
    return SlotOutcome(status if inserted else TAKEN, batch_name(plan, slot_at), reason=reason)


def _busy_reason(ctx: SlotContext, plan: Plan, slot_at: datetime) -> str | None:
    """Why the slot is skipped under `overlap = skip`: the previous batch still has unfinished jobs."""
    with transaction(ctx.sessions) as session:
        previous = store.previous_batch(session=session, plan_id=plan.id, before=slot_at)
        if previous is None:
            return None
        unfinished = count_batch(session=session, batch_id=previous).live
        name = session.get(Batch, previous)
    if not unfinished:
        return None
    shown = name.name if name is not None else previous
    return f"the previous batch {shown} still has {unfinished} unfinished job(s); overlap = skip"


def _claim(ctx: SlotContext, plan: Plan, slot_at: datetime, *, kind: str, note: str | None) -> AfterInsert:
    """The hook that writes the slot row (and the webhook subscription) in the batch's transaction."""

    def claim(session: Session, batch_id: str, _job_ids: Mapping[int, str]) -> None:
        inserted = store.record_slot(
            session=session,
            plan_id=plan.id,
            slot_at=slot_at,
            kind=kind,
            status=PlanSlotStatus.submitted.value,
            decided_at=ctx.now(),
            batch_id=batch_id,
            reason=note,
        )
        if not inserted:
            raise SlotTaken(batch_id)
        if plan.webhook_url:
            subscribe(
                session=session,
                subject_id=batch_id,
                kind="batch",
                tenant=plan.tenant,
                url=plan.webhook_url,
                events=[BATCH_COMPLETED],
            )

    return claim


def _submit(ctx: SlotContext, plan: Plan, slot_at: datetime, *, kind: str, note: str | None) -> SlotOutcome:
    name = batch_name(plan, slot_at)
    local = reads_local_files(plan.source)  # a plan from the API stays remote-only at every slot
    rows = read_plan_rows(plan.manifest, defaults=json.loads(plan.defaults), settings=ctx.settings, local=local)
    result = submit_rows(
        settings=ctx.settings,
        sessions=ctx.sessions,
        parsed=rows.parsed,
        resolver=rows.resolver,
        batch_name=name,
        model_set=plan.model_set,
        model_set_file=plan.model_set_file,
        options=RowOptions(tenant=plan.tenant, after_insert=_claim(ctx, plan, slot_at, kind=kind, note=note)),
    )
    return SlotOutcome(PlanSlotStatus.submitted.value, name, result.batch_id, note, result.added)


def run_slot(
    ctx: SlotContext, plan: Plan, slot_at: datetime, *, kind: str = store.SCHEDULED, note: str | None = None
) -> SlotOutcome:
    """Decide one slot: its batch, or a skipped or failed row; `taken` when another process decided it.

    Transient errors (a service down) propagate and record nothing: the slot stays due.
    """
    # 1. Decided already (by another beat, or by this one before a restart)?
    with transaction(ctx.sessions) as session:
        if store.slot_decided(session=session, plan_id=plan.id, slot_at=slot_at):
            return SlotOutcome(TAKEN, batch_name(plan, slot_at))
    # 2. overlap = skip: not while the previous batch runs (a manual run is always run).
    busy = _busy_reason(ctx, plan, slot_at) if kind == store.SCHEDULED and plan.overlap == "skip" else None
    if busy is not None:
        return _record(ctx, plan, slot_at, kind=kind, status=PlanSlotStatus.skipped.value, reason=busy)
    # 3. The manifest as it is now; the batch, its jobs and the slot row in one transaction.
    failed = PlanSlotStatus.failed.value
    try:
        return _submit(ctx, plan, slot_at, kind=kind, note=note)
    except SlotTaken:
        return SlotOutcome(TAKEN, batch_name(plan, slot_at))
    except QuotaExceeded as e:  # the tenant's quota: not run, and the next slot runs as usual
        skipped = PlanSlotStatus.skipped.value
        return _record(ctx, plan, slot_at, kind=kind, status=skipped, reason=f"over quota: {e}")
    except ManifestInvalid as e:
        return _record(ctx, plan, slot_at, kind=kind, status=failed, reason=_problems_text(e.problems))
    except PermanentError as e:
        return _record(ctx, plan, slot_at, kind=kind, status=failed, reason=str(e))


def record_missed(ctx: SlotContext, plan: Plan, slot_at: datetime, *, reason: str) -> SlotOutcome:
    """A scheduled slot not run because it was missed (`catch_up = none`): a skipped row."""
    return _record(ctx, plan, slot_at, kind=store.SCHEDULED, status=PlanSlotStatus.skipped.value, reason=reason)
