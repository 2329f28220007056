"""Usage reports: what tenants used per day, batch, lane or model set, summed in SQL on the rollup.

The rollup (`usage_rollup`, kept by the transactions that end jobs) has a row per tenant,
UTC day, batch and lane, so a report reads and groups those rows, never the jobs: its cost
follows the number of batches and days in the range, not the number of jobs (BENCHMARKS.md).

One report serves `ipab usage` (a table, `--json`, `--csv`) and `GET /v1/usage` (a tenant
its own; an admin key every tenant's). Dates are UTC days; `since` and `until` are both
included. `gpu_seconds` is billed; `lost_gpu_seconds` (attempts killed, taken over or
failed) is shown, not billed.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from typing import Any, Final

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.db import Batch, UsageRollup
from shared.errors import InvalidInput

GROUPS: Final = ("day", "batch", "lane", "model_set")
FIGURES: Final = ("jobs", "images", "gpu_seconds", "lost_gpu_seconds", "pixel_steps", "queue_seconds", "total_seconds")
_COLUMNS: Final = {
    "day": UsageRollup.day,
    "batch": UsageRollup.batch_id,
    "lane": UsageRollup.lane,
    "model_set": UsageRollup.model_set,
}


@dataclass(frozen=True)
class UsageQuery:
    """What to report: one tenant (None: every tenant), a range of UTC days (both included), a grouping."""

    tenant: str | None = None
    since: date | None = None
    until: date | None = None
    by: str = "day"

    def __post_init__(self) -> None:
        if self.by not in GROUPS:
            raise InvalidInput("by", self.by, f"must be one of {', '.join(GROUPS)}")
        check_range(self.since, self.until)


def check_range(since: date | None, until: date | None, *, names: tuple[str, str] = ("since", "until")) -> None:
    """Refuse a range that ends before it starts, naming both ends as the caller calls them
    (`names`: the API's query parameters, or the CLI's flags)."""
    if since is not None and until is not None and since > until:
        first, last = names
        fix = f"give an {last} on or after {first} (both days are included), or leave one out"
        raise InvalidInput(last, until.isoformat(), f"is before {first} {since.isoformat()}; {fix}")


@dataclass(frozen=True)
class UsageRow:
    """One tenant's usage in one group (a day, a batch, a lane or a model set)."""

    tenant: str
    group: str  # the day (YYYY-MM-DD), batch id, lane or model set
    jobs: int  # jobs that ended: succeeded, failed or canceled
    images: int
    gpu_seconds: float  # billed
    lost_gpu_seconds: float  # shown, not billed
    pixel_steps: int
    queue_seconds: float  # summed over the images: the mean wait is queue_seconds / images
    total_seconds: float
    batch_name: str | None = None  # for `by = batch`, while the batch is there


@dataclass(frozen=True)
class UsageReport:
    """The rows of a report and their totals per tenant."""

    query: UsageQuery
    rows: list[UsageRow]
    totals: dict[str, dict[str, float]] = field(default_factory=dict)  # tenant -> figure -> sum

    def to_json(self) -> dict[str, Any]:
        """The report as `GET /v1/usage` and `ipab usage --json` give it."""
        by = self.query.by
        return {
            "tenant": self.query.tenant,
            "since": self.query.since.isoformat() if self.query.since else None,
            "until": self.query.until.isoformat() if self.query.until else None,
            "by": by,
            "rows": [row_json(row, by) for row in self.rows],
            "totals": self.totals,
        }


def row_json(row: UsageRow, by: str) -> dict[str, Any]:
    """One row as JSON: its group under the grouping's name (`day`, `batch`...), then its figures."""
    shown: dict[str, Any] = {"tenant": row.tenant, by: row.group}
    if by == "batch":
        shown["batch_name"] = row.batch_name
    shown.update({name: getattr(row, name) for name in FIGURES})  # not asdict: it deep-copies every value
    return shown


def usage_report(*, session: Session, query: UsageQuery) -> UsageReport:
    """Sum the rollup rows of the query's tenant and days, per tenant and group."""
    group = _COLUMNS[query.by]
    r = UsageRollup
    sums = (
        func.sum(r.jobs),
        func.sum(r.images),
        func.sum(r.gpu_s),
        func.sum(r.lost_gpu_s),
        func.sum(r.pixel_steps),
        func.sum(r.queue_s),
        func.sum(r.total_s),
    )
    stmt = select(r.tenant, group, *sums).group_by(r.tenant, group).order_by(r.tenant, group)
    if query.tenant is not None:
        stmt = stmt.where(r.tenant == query.tenant)
    if query.since is not None:
        stmt = stmt.where(r.day >= query.since)
    if query.until is not None:
        stmt = stmt.where(r.day <= query.until)
    rows = [_row(values) for values in session.execute(stmt).tuples()]
    if query.by == "batch" and rows:
        rows = _named(session, rows)
    return UsageReport(query=query, rows=rows, totals=_totals(rows))


def _row(values: Sequence[Any]) -> UsageRow:
    tenant, group, jobs, images, gpu_s, lost_s, pixel_steps, queue_s, total_s = values
    return UsageRow(
        tenant=tenant,
        group=group.isoformat() if isinstance(group, date) else str(group),
        jobs=int(jobs or 0),
        images=int(images or 0),
        gpu_seconds=round(float(gpu_s or 0.0), 3),
        lost_gpu_seconds=round(float(lost_s or 0.0), 3),
        pixel_steps=int(pixel_steps or 0),
        queue_seconds=round(float(queue_s or 0.0), 3),
        total_seconds=round(float(total_s or 0.0), 3),
    )


def _named(session: Session, rows: list[UsageRow]) -> list[UsageRow]:
    """The batch rows with their batches' names (a deleted batch keeps its usage, without a name)."""
    ids = sorted({row.group for row in rows})
    names: dict[str, str] = {}
    for start in range(0, len(ids), 1000):
        chunk = ids[start : start + 1000]
        names.update(session.execute(select(Batch.id, Batch.name).where(Batch.id.in_(chunk))).tuples().all())
    return [replace(row, batch_name=names.get(row.group)) for row in rows]


def _totals(rows: Sequence[UsageRow]) -> dict[str, dict[str, float]]:
    totals: dict[str, dict[str, float]] = {}
    for row in rows:
        tenant = totals.setdefault(row.tenant, dict.fromkeys(FIGURES, 0))
        for name in FIGURES:
            tenant[name] = round(tenant[name] + getattr(row, name), 3)
    return totals


def report_csv(report: UsageReport) -> str:
    """The report's rows as CSV text with a header line (`ipab usage --csv`)."""
    out = io.StringIO()
    by = report.query.by
    header = ["tenant", by, *(["batch_name"] if by == "batch" else []), *FIGURES]
    writer = csv.DictWriter(out, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        writer.writerow(row_json(row, by))
    return out.getvalue()


def tenant_totals(*, session: Session) -> list[tuple[str, float, float, int]]:
    """(tenant, billed GPU-seconds, lost GPU-seconds, images) of every tenant, all time: the
    operator's counters (`ipab_tenant_gpu_seconds_total`...), read at scrape time."""
    r = UsageRollup
    stmt = (
        select(r.tenant, func.sum(r.gpu_s), func.sum(r.lost_gpu_s), func.sum(r.images))
        .group_by(r.tenant)
        .order_by(r.tenant)
    )
    return [
        (tenant, float(gpu_s or 0.0), float(lost_s or 0.0), int(images or 0))
        for tenant, gpu_s, lost_s, images in session.execute(stmt).tuples()
    ]
