"""Builders shared by the scheduler's test folders."""

from __future__ import annotations

from datetime import date
from typing import cast

from sqlalchemy import Table

from shared.db import UsageRollup, ensure_database, make_engine, make_session_factory
from shared.jobs import transaction
from shared.settings import Settings


def fill_usage_rollup(
    settings: Settings, batches: dict[str, int], *, images: int = 1, gpu_s: float = 1.5
) -> list[tuple[str, str]]:
    """Per tenant, its count of batches with usage on one day: one rollup row each, of `images` jobs
    and images and `gpu_s` GPU-seconds. Their (tenant, batch id), in report order."""
    ensure_database(settings.database_url)
    rows = [
        {
            "tenant": tenant, "day": date(2026, 12, 1), "batch_id": f"{tenant}-{i:05d}", "lane": "bulk",
            "model_set": "tiny", "jobs": images, "images": images, "gpu_s": gpu_s, "lost_gpu_s": 0.0,
            "pixel_steps": 10, "queue_s": 1.0, "total_s": 2.0,
        }
        for tenant, count in batches.items()
        for i in range(count)
    ]  # fmt: skip
    engine = make_engine(settings.database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            session.execute(cast(Table, UsageRollup.__table__).insert(), rows)
    finally:
        engine.dispose()
    return sorted((row["tenant"], row["batch_id"]) for row in rows)
