"""Usage reports: what tenants used per day, batch, lane or model set, summed in SQL on the rollup.

The rollup (`usage_rollup`, kept by the transactions that end jobs) has a row per tenant,
UTC day, batch and lane, so a report reads and groups those rows, never the jobs: its cost
follows the number of batches and days in the range, not the number of jobs (BENCHMARKS.md).

One report serves `ipab usage` (a table, `--json`, `--csv`) and `GET /v1/usage` (a tenant
its own; an admin key every tenant's). Dates are UTC days; `since` and `until` are both
included. `gpu_seconds` is billed; `lost_gpu_seconds` (attempts killed, taken over or
failed) is shown, not billed.

Rows come a page at a time, in (tenant, group) order, each page past the last key of the one
before (keyset paging): a report by batch can have a row per batch ever run, and read whole
it cost seconds and tens of MB (200,000 rows: 4-7 s, 43 MB of JSON). The cursor carries that
key and nothing else; the tenant filter always comes from the query, so a cursor, however
written, moves within the caller's rows and never reaches another tenant's.
"""

from __future__ import annotations

import base64
import binascii
import csv
import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, Final, TextIO

from sqlalchemy import ColumnElement, Select, func, literal, null, select, tuple_
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
_SUMS: Final = (  # in the order of FIGURES, named as they are
    func.sum(UsageRollup.jobs).label("jobs"),
    func.sum(UsageRollup.images).label("images"),
    func.sum(UsageRollup.gpu_s).label("gpu_seconds"),
    func.sum(UsageRollup.lost_gpu_s).label("lost_gpu_seconds"),
    func.sum(UsageRollup.pixel_steps).label("pixel_steps"),
    func.sum(UsageRollup.queue_s).label("queue_seconds"),
    func.sum(UsageRollup.total_s).label("total_seconds"),
)
PAGE_ROWS: Final = 1000  # rows per page unless the caller asks for another `limit`
MAX_PAGE_ROWS: Final = 10_000  # ~2 MB of JSON: a page stays well under a second to read and send
MAX_CURSOR_CHARS: Final = 1000  # a cursor holds a tenant (100), a group (200) and the grouping
TOTALS_COVER: Final = "range"  # the totals sum every row of the query's range, not only the page's


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
class UsagePage:
    """Which rows of a report: at most `limit`, those past `after` (the cursor that the page
    before gave as `next_after`; None: from the first row)."""

    limit: int = PAGE_ROWS
    after: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.limit <= MAX_PAGE_ROWS:
            fix = f"ask for 1 to {MAX_PAGE_ROWS:,} rows a page and follow `next` for the rest"
            raise InvalidInput("limit", self.limit, fix)


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
    """A page of a report's rows, the totals per tenant of its whole range, and the next page's cursor."""

    query: UsageQuery
    rows: list[UsageRow]
    totals: dict[str, dict[str, float]]  # tenant -> figure -> sum over the range (every page)
    limit: int = PAGE_ROWS
    next_after: str | None = None  # None: this page holds the last row

    def to_json(self) -> dict[str, Any]:
        """The page as `GET /v1/usage` gives it (the fields of old, then the paging ones)."""
        rows = [row_json(row, self.query.by) for row in self.rows]
        paging = {"limit": self.limit, "next_after": self.next_after, "totals_cover": TOTALS_COVER}
        return {**report_head(self.query), "rows": rows, "totals": self.totals, **paging}


def report_head(query: UsageQuery) -> dict[str, Any]:
    """What a report is of, as JSON: tenant, since, until, by."""
    return {
        "tenant": query.tenant,
        "since": query.since.isoformat() if query.since else None,
        "until": query.until.isoformat() if query.until else None,
        "by": query.by,
    }


def row_json(row: UsageRow, by: str) -> dict[str, Any]:
    """One row as JSON: its group under the grouping's name (`day`, `batch`...), then its figures."""
    shown: dict[str, Any] = {"tenant": row.tenant, by: row.group}
    if by == "batch":
        shown["batch_name"] = row.batch_name
    shown.update({name: getattr(row, name) for name in FIGURES})  # not asdict: it deep-copies every value
    return shown


def usage_report(*, session: Session, query: UsageQuery, page: UsagePage | None = None) -> UsageReport:
    """One page of the report (the first PAGE_ROWS rows unless `page` says otherwise) and the
    totals of its whole range; `next_after` is the cursor of the page after, if there is one."""
    page = page or UsagePage()
    after = decode_cursor(page.after, query) if page.after is not None else None
    stmt = _statement(query, after=after, limit=page.limit + 1)  # one more: is there a next page?
    rows = [_row(values) for values in session.execute(stmt).tuples()]
    more = len(rows) > page.limit
    rows = rows[: page.limit]
    next_after = encode_cursor(query, rows[-1]) if more else None
    return UsageReport(query, rows, usage_totals(session=session, query=query), page.limit, next_after)


def report_rows(*, session: Session, query: UsageQuery) -> Iterator[UsageRow]:
    """Every row of the report in key order, streamed from one statement PAGE_ROWS at a time:
    memory holds one chunk whatever the range, and the rollup is summed once (walking the pages
    sums the rest of the range again for each: 200,000 batch rows took 20 s on SQLite)."""
    stmt = _statement(query).execution_options(yield_per=PAGE_ROWS)
    for chunk in session.execute(stmt).tuples().partitions():
        yield from (_row(values) for values in chunk)


def usage_totals(*, session: Session, query: UsageQuery) -> dict[str, dict[str, float]]:
    """Each tenant's sums over the query's whole range (every page's rows): tenant -> figure -> sum."""
    stmt = select(UsageRollup.tenant, *_SUMS).where(*_in_range(query)).group_by(UsageRollup.tenant)
    totals: dict[str, dict[str, float]] = {}
    for tenant, *sums in session.execute(stmt.order_by(UsageRollup.tenant)).tuples():
        totals[tenant] = _figures(sums)
    return totals


def _in_range(query: UsageQuery) -> list[ColumnElement[bool]]:
    """The conditions on rollup rows of the query's tenant and days."""
    r = UsageRollup
    conditions = [] if query.tenant is None else [r.tenant == query.tenant]
    if query.since is not None:
        conditions.append(r.day >= query.since)
    if query.until is not None:
        conditions.append(r.day <= query.until)
    return conditions


def _statement(query: UsageQuery, *, after: tuple[str, Any] | None = None, limit: int | None = None) -> Select[Any]:
    """The report's rows past the key `after` (tenant, group), at most `limit`, in key order: the
    query's rollup rows summed per tenant and group, then a batch's name (NULL for the others)."""
    r, group = UsageRollup, _COLUMNS[query.by]
    stmt = select(r.tenant.label("tenant"), group.label("key"), *_SUMS).where(*_in_range(query))
    if after is not None:
        stmt = stmt.where(tuple_(r.tenant, group) > tuple_(literal(after[0]), literal(after[1], group.type)))
    rows = stmt.group_by(r.tenant, group).order_by(r.tenant, group).limit(limit)
    if query.by != "batch":
        return rows.add_columns(null())
    # Names joined to the page's rows, not to the rollup's: a lookup per row shown, not per row summed.
    page = rows.subquery()
    named = select(*page.c, Batch.name).outerjoin_from(page, Batch, Batch.id == page.c.key)
    return named.order_by(page.c.tenant, page.c.key)


def _row(values: Sequence[Any]) -> UsageRow:
    """A row from (tenant, group, figures..., batch name)."""
    tenant, group, *sums, batch_name = values
    shown = group.isoformat() if isinstance(group, date) else str(group)
    return UsageRow(tenant=tenant, group=shown, **_figures(sums), batch_name=batch_name)


def _figures(sums: Sequence[Any]) -> dict[str, Any]:
    jobs, images, gpu_s, lost_s, pixel_steps, queue_s, total_s = sums
    return {
        "jobs": int(jobs or 0),
        "images": int(images or 0),
        "gpu_seconds": round(float(gpu_s or 0.0), 3),
        "lost_gpu_seconds": round(float(lost_s or 0.0), 3),
        "pixel_steps": int(pixel_steps or 0),
        "queue_seconds": round(float(queue_s or 0.0), 3),
        "total_seconds": round(float(total_s or 0.0), 3),
    }


def encode_cursor(query: UsageQuery, row: UsageRow) -> str:
    """The cursor of the rows after `row`: its key and the grouping, as URL-safe text (opaque to callers)."""
    text = json.dumps([query.by, row.tenant, row.group], separators=(",", ":"), ensure_ascii=False)
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def decode_cursor(cursor: str, query: UsageQuery) -> tuple[str, Any]:
    """The key (tenant, group) an `encode_cursor` text holds; `InvalidInput` naming `after` for
    anything else, a cursor of another grouping, or of another tenant than the query's."""
    fix = "pass the `next_after` of the page before as it is (or follow `next`); leave `after` out for the first page"
    try:
        if len(cursor) > MAX_CURSOR_CHARS:
            raise ValueError("too long")
        by, tenant, group = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        if not (isinstance(by, str) and isinstance(tenant, str) and isinstance(group, str)):
            raise ValueError("not three strings")
        if "\x00" in tenant + group:  # no key holds one, and PostgreSQL refuses it in a parameter
            raise ValueError("a NUL character")
        key = (tenant, _group_value(by, group))
    except (ValueError, TypeError, binascii.Error):  # json.JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise InvalidInput("after", cursor, f"is not a cursor of a usage report; {fix}") from None
    if by != query.by or query.tenant not in (None, tenant):
        raise InvalidInput("after", cursor, f"is a cursor of another report than this by={query.by} one; {fix}")
    return key


def _group_value(by: str, group: str) -> Any:
    """A row's group as its column holds it (a day is a date), to compare keys in SQL."""
    return date.fromisoformat(group) if by == "day" else group


def write_csv(out: TextIO, *, by: str, rows: Iterable[UsageRow]) -> None:
    """The rows as CSV with a header line (`ipab usage --csv`), written as they come."""
    header = ["tenant", by, *(["batch_name"] if by == "batch" else []), *FIGURES]
    writer = csv.DictWriter(out, fieldnames=header, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row_json(row, by))


def write_json(out: TextIO, *, query: UsageQuery, rows: Iterable[UsageRow], totals: dict[str, Any]) -> None:
    """The whole report as one JSON object (`ipab usage --json`), a row a line, written as the rows
    come: the fields of `UsageReport.to_json` less the paging ones (there is one page: all of it)."""
    out.write("{\n")
    for name, value in report_head(query).items():
        out.write(f"  {json.dumps(name)}: {json.dumps(value)},\n")
    out.write('  "rows": [')
    separator = "\n    "
    for row in rows:
        out.write(separator + json.dumps(row_json(row, query.by), ensure_ascii=False))
        separator = ",\n    "
    out.write("\n  ],\n" if separator != "\n    " else "],\n")
    out.write('  "totals": ' + json.dumps(totals, indent=2).replace("\n", "\n  ") + ",\n")
    out.write(f'  "totals_cover": "{TOTALS_COVER}"\n}}\n')


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
