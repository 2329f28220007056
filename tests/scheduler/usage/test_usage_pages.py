"""A usage report comes a page at a time (SQLite and PostgreSQL): at most `limit` rows in (tenant,
group) order, a cursor to the rest, totals over the whole range; walking the pages gives every row
once; a cursor moves within the query's tenant only, and one that is not a cursor is refused."""

from __future__ import annotations

import base64
import json
from datetime import date, timedelta
from typing import Any, cast

import pytest
from sqlalchemy import Table
from sqlalchemy.orm import Session, sessionmaker

from scheduler.usage import report as usage
from scheduler.usage.report import MAX_PAGE_ROWS, UsagePage, UsageQuery, report_rows, usage_report
from shared.db import Batch, UsageRollup
from shared.errors import InvalidInput
from shared.jobs import transaction

DAY = date(2026, 12, 1)


def fill(sessions: sessionmaker[Session], batches: dict[str, int]) -> list[tuple[str, str]]:
    """Per tenant, its count of batches, each with usage on two days, in two lanes on the first (three
    rollup rows), every other batch still there with a name; the (tenant, batch id) of each, in report order."""
    rows: list[dict[str, Any]] = []
    named: list[dict[str, Any]] = []
    for tenant, count in batches.items():
        for i in range(count):
            batch_id = f"{tenant}-{i:05d}"
            if i % 2 == 0:
                named.append(
                    {"id": batch_id, "name": f"{batch_id}-name", "model_set": "tiny", "tenant": tenant, "job_count": 0}
                )
            for day, lane in [(DAY, "bulk"), (DAY, "interactive"), (DAY + timedelta(days=1), "bulk")]:
                rows.append(
                    {
                        "tenant": tenant, "day": day, "batch_id": batch_id, "lane": lane, "model_set": "tiny",
                        "jobs": 1, "images": 1, "gpu_s": 0.5, "lost_gpu_s": 0.25, "pixel_steps": 10,
                        "queue_s": 1.0, "total_s": 2.0,
                    }
                )  # fmt: skip
    with transaction(sessions) as session:
        session.execute(cast(Table, UsageRollup.__table__).insert(), rows)
        if named:
            session.execute(cast(Table, Batch.__table__).insert(), named)
    return sorted((tenant, f"{tenant}-{i:05d}") for tenant, count in batches.items() for i in range(count))


def walk(sessions: sessionmaker[Session], query: UsageQuery, limit: int) -> list[usage.UsageReport]:
    """Every page of the report, `limit` rows each, following `next_after`."""
    pages, after = [], None
    while True:
        with transaction(sessions) as session:
            page = usage_report(session=session, query=query, page=UsagePage(limit=limit, after=after))
        pages.append(page)
        if page.next_after is None:
            return pages
        after = page.next_after


def forged(*key: str) -> str:
    """A cursor written by hand, as a caller could: the encoding is plain base64 of JSON."""
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


def test_a_page_holds_at_most_limit_rows_and_the_default_is_one_thousand(sessions: sessionmaker[Session]) -> None:
    fill(sessions, {"acme": 1003})
    with transaction(sessions) as session:
        first = usage_report(session=session, query=UsageQuery(by="batch"))
        small = usage_report(session=session, query=UsageQuery(by="batch"), page=UsagePage(limit=7))

    assert len(first.rows) == usage.PAGE_ROWS == 1000 and first.next_after is not None
    assert len(small.rows) == 7 and small.next_after is not None
    # The totals cover the whole range, not the page: 1003 batches, three rollup rows each.
    assert first.totals == small.totals
    assert first.totals["acme"]["jobs"] == 3 * 1003 and first.to_json()["totals_cover"] == "range"


@pytest.mark.parametrize("by", ["batch", "day", "lane"])
def test_walking_the_pages_gives_every_row_once_in_order(sessions: sessionmaker[Session], by: str) -> None:
    fill(sessions, {"acme": 23, "globex": 11, "initech": 1})
    with transaction(sessions) as session:
        whole = usage_report(session=session, query=UsageQuery(by=by), page=UsagePage(limit=MAX_PAGE_ROWS))

    pages = walk(sessions, UsageQuery(by=by), limit=4)

    walked = [row for page in pages for row in page.rows]
    assert all(len(page.rows) <= 4 for page in pages) and pages[-1].next_after is None
    assert walked == whole.rows  # same rows, same order, none twice, none left out
    assert len(walked) == len({(row.tenant, row.group) for row in walked})
    assert all(page.totals == whole.totals for page in pages)


def test_batch_rows_across_pages_keep_their_names_and_sums(sessions: sessionmaker[Session]) -> None:
    keys = fill(sessions, {"acme": 9, "globex": 4})

    rows = [row for page in walk(sessions, UsageQuery(by="batch"), limit=5) for row in page.rows]

    assert [(row.tenant, row.group) for row in rows] == keys
    assert all(row.jobs == 3 and row.gpu_seconds == 1.5 for row in rows)
    assert [row.batch_name for row in rows[:3]] == ["acme-00000-name", None, "acme-00002-name"]


def test_a_tenant_walks_its_own_rows_only(sessions: sessionmaker[Session]) -> None:
    keys = fill(sessions, {"acme": 6, "bravo": 7, "zulu": 5})
    query = UsageQuery(tenant="bravo", by="batch")

    rows = [row for page in walk(sessions, query, limit=2) for row in page.rows]

    assert [(row.tenant, row.group) for row in rows] == [key for key in keys if key[0] == "bravo"]


@pytest.mark.parametrize(
    "cursor",
    [
        forged("batch", "acme", "acme-00002"),  # another tenant's key, before this one's rows
        forged("batch", "zulu", "zulu-00001"),  # another tenant's key, after them
        forged("batch", "", ""),
        forged("day", "bravo", "2026-12-01"),  # a cursor of another grouping
    ],
)
def test_a_cursor_of_another_tenant_or_grouping_is_refused(sessions: sessionmaker[Session], cursor: str) -> None:
    fill(sessions, {"acme": 3, "bravo": 3, "zulu": 3})
    with transaction(sessions) as session, pytest.raises(InvalidInput) as refused:
        usage_report(session=session, query=UsageQuery(tenant="bravo", by="batch"), page=UsagePage(after=cursor))
    assert refused.value.field == "after" and "another report" in str(refused.value)


@pytest.mark.parametrize("group", ["", "bravo-00001", "zzzz", "acme-00002"])
def test_a_hand_written_cursor_of_the_tenant_moves_within_its_rows(sessions: sessionmaker[Session], group: str) -> None:
    fill(sessions, {"acme": 3, "bravo": 3, "zulu": 3})
    with transaction(sessions) as session:
        page = usage_report(
            session=session,
            query=UsageQuery(tenant="bravo", by="batch"),
            page=UsagePage(after=forged("batch", "bravo", group)),
        )
    assert {row.tenant for row in page.rows} <= {"bravo"}
    assert set(page.totals) == {"bravo"}


@pytest.mark.parametrize(
    "cursor", ["not base64!", "e30", forged("batch", "acme"), forged("day", "acme", "2026-13-01"), "QQ" * 600]
)
def test_a_cursor_that_is_not_one_is_refused_naming_after_and_the_fix(
    sessions: sessionmaker[Session], cursor: str
) -> None:
    with transaction(sessions) as session, pytest.raises(InvalidInput) as refused:
        usage_report(session=session, query=UsageQuery(by="day"), page=UsagePage(after=cursor))
    e = refused.value
    assert (e.field, e.value) == ("after", cursor)
    assert "next_after" in e.allowed and "leave `after` out for the first page" in e.allowed


@pytest.mark.parametrize("limit", [0, -1, MAX_PAGE_ROWS + 1])
def test_a_limit_out_of_range_is_refused_naming_it_and_the_range(limit: int) -> None:
    with pytest.raises(InvalidInput) as refused:
        UsagePage(limit=limit)
    assert (refused.value.field, refused.value.value) == ("limit", limit)
    assert f"1 to {MAX_PAGE_ROWS:,} rows a page" in str(refused.value)


def test_report_rows_streams_every_row_a_chunk_at_a_time(
    sessions: sessionmaker[Session], monkeypatch: pytest.MonkeyPatch
) -> None:
    """What `ipab usage` prints: all of the report, in order, with the batches' names, read from one
    statement PAGE_ROWS rows at a time (here 3, so 13 rows cross four chunk boundaries)."""
    keys = fill(sessions, {"acme": 8, "globex": 5})
    monkeypatch.setattr(usage, "PAGE_ROWS", 3)
    with transaction(sessions) as session:
        rows = list(report_rows(session=session, query=UsageQuery(by="batch")))

    assert [(row.tenant, row.group) for row in rows] == keys
    assert [row.batch_name for row in rows[:4]] == ["acme-00000-name", None, "acme-00002-name", None]
    assert rows[-1].batch_name == "globex-00004-name" and all(row.jobs == 3 for row in rows)
