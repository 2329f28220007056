"""A plan's slot whose jobs would pass its tenant's quota is recorded as skipped, with the reason;
the slots before and after it run as usual."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from scheduler.usage.quotas import set_quotas
from shared.jobs import transaction
from shared.settings import Settings
from tests.scheduler.plans.conftest import (
    Clock,
    apply,
    batch_names,
    plan_context,
    plan_fields,
    run_days,
    slots,
    write_manifest,
    write_plan,
)


def test_a_slot_over_quota_is_skipped_with_the_quota_in_its_reason(settings: Settings, tmp_path: Path) -> None:
    write_manifest(tmp_path, rows=2)
    clock = Clock(datetime(2025, 12, 31, 12, 0))
    with plan_context(settings, clock) as ctx:
        fields = plan_fields(tenant="nightly-team", overlap="queue")
        assert apply(ctx, write_plan(tmp_path, **fields)) == "created"
        with transaction(ctx.sessions) as session:  # room for one night's two jobs, not two nights'
            set_quotas(session=session, tenant="nightly-team", changes={"images_per_month": 3})

        run_days(ctx, clock, 2)

        assert batch_names(ctx.sessions) == ["nightly@2026-01-01T02:00:00+00:00"]
        first, second = slots(ctx.sessions)
        assert (first.status, second.status, second.batch_id) == ("submitted", "skipped", None)
        assert (second.reason or "").startswith(
            "over quota: tenant 'nightly-team' is at its quota images_per_month = 3 images: 2 used, 2 more asked"
        )
