"""GET /v1/usage answers a page at a time (SQLite and PostgreSQL): at most `limit` rows (1000 by
default), `next` links the rest, totals cover the whole range; following `next` gives every row
once; a tenant's key walks its own rows only, whatever cursor it sends; a bad `limit` or `after`
is a 422 problem naming it, its value and the fix."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from scheduler.usage.report import MAX_PAGE_ROWS
from shared.settings import Settings
from tests.scheduler.api.conftest import assert_problem
from tests.scheduler.conftest import fill_usage_rollup


@pytest.fixture
def api_settings(api_settings: Settings, database_url: str) -> Settings:
    """The API's settings on SQLite or on PostgreSQL."""
    return api_settings.model_copy(update={"database_url": database_url})


def walk(client: TestClient, headers: dict[str, str], first: str) -> list[dict[str, Any]]:
    """Every page from `first`, following `next`."""
    pages, url = [], first
    while url:
        r = client.get(url, headers=headers)
        assert r.status_code == 200, r.text
        pages.append(r.json())
        url = r.json()["next"]
    return pages


def forged(*key: str) -> str:
    """A cursor written by hand: base64 of JSON, as anyone can read off a real one."""
    return base64.urlsafe_b64encode(json.dumps(list(key)).encode()).decode().rstrip("=")


def test_a_page_holds_at_most_a_thousand_rows_by_default_and_links_the_next(
    client: TestClient, api_settings: Settings, admin: dict[str, str]
) -> None:
    fill_usage_rollup(api_settings, {"alice": 1004, "bob": 2}, images=2, gpu_s=1.5)

    r = client.get("/v1/usage?by=batch", headers=admin)

    assert r.status_code == 200, r.text
    page = r.json()
    assert len(page["rows"]) == 1000 and page["limit"] == 1000
    assert page["next"].startswith("/v1/usage?") and "by=batch" in page["next"] and page["next_after"]
    # The fields of old are there; the totals are the range's: every page's rows, not this one's.
    assert {"tenant", "since", "until", "by", "rows", "totals"} <= set(page)
    assert page["totals_cover"] == "range"
    assert (page["totals"]["alice"]["jobs"], page["totals"]["bob"]["jobs"]) == (2 * 1004, 4)


def test_following_next_gives_every_row_once_in_order(
    client: TestClient, api_settings: Settings, admin: dict[str, str]
) -> None:
    keys = fill_usage_rollup(api_settings, {"alice": 17, "bob": 9, "carol": 1}, images=2, gpu_s=1.5)

    pages = walk(client, admin, "/v1/usage?by=batch&since=2026-12-01&until=2026-12-31&limit=5")

    assert [len(page["rows"]) for page in pages] == [5, 5, 5, 5, 5, 2]
    assert [(row["tenant"], row["batch"]) for page in pages for row in page["rows"]] == keys
    assert pages[-1]["next"] is None and pages[-1]["next_after"] is None
    assert all(page["totals"] == pages[0]["totals"] for page in pages)
    assert all(page["since"] == "2026-12-01" and page["limit"] == 5 for page in pages)  # `next` keeps the query


def test_a_tenants_key_walks_its_own_rows_only(
    client: TestClient, api_settings: Settings, alice: dict[str, str]
) -> None:
    keys = fill_usage_rollup(api_settings, {"aaron": 4, "alice": 7, "bob": 6}, images=2, gpu_s=1.5)

    pages = walk(client, alice, "/v1/usage?by=batch&limit=3")

    assert [(row["tenant"], row["batch"]) for page in pages for row in page["rows"]] == [
        key for key in keys if key[0] == "alice"
    ]
    assert all(set(page["totals"]) == {"alice"} and page["tenant"] == "alice" for page in pages)
    assert all("tenant=" not in (page["next"] or "") for page in pages)  # the key says whose, not the link


@pytest.mark.parametrize(
    "after",
    [
        forged("batch", "aaron", "aaron-00001"),
        forged("batch", "bob", "bob-00002"),
        forged("batch", "", ""),
        forged("batch", "alice", ""),
        forged("batch", "alice", "alice-00003"),
        forged("batch", "alice", "zzz"),
        forged("day", "bob", "2026-12-01"),
    ],
)
def test_a_hand_written_cursor_shows_a_tenant_no_other_tenants_rows(
    client: TestClient, api_settings: Settings, alice: dict[str, str], after: str
) -> None:
    fill_usage_rollup(api_settings, {"aaron": 4, "alice": 7, "bob": 6}, images=2, gpu_s=1.5)

    r = client.get(f"/v1/usage?by=batch&after={after}", headers=alice)

    if r.status_code == 200:
        assert {row["tenant"] for row in r.json()["rows"]} <= {"alice"}, r.json()
        assert set(r.json()["totals"]) == {"alice"}
    else:
        assert_problem(r, 422, "after", "another report")


@pytest.mark.parametrize("limit", ["0", "-5", str(MAX_PAGE_ROWS + 1)])
def test_a_limit_out_of_range_is_a_422_naming_it_its_value_and_the_range(
    client: TestClient, alice: dict[str, str], limit: str
) -> None:
    r = client.get(f"/v1/usage?by=batch&limit={limit}", headers=alice)
    assert_problem(r, 422, "limit", limit, f"1 to {MAX_PAGE_ROWS:,} rows a page", "follow `next`")
    assert r.json()["errors"][0]["field"] == "limit" and r.json()["errors"][0]["value"] == int(limit)


def test_a_limit_that_is_not_a_number_is_a_422_naming_it(client: TestClient, alice: dict[str, str]) -> None:
    assert_problem(client.get("/v1/usage?limit=many", headers=alice), 422, "limit", "many", "integer")


@pytest.mark.parametrize(
    "after", ["garbage!", "e30", forged("batch", "alice"), forged("batch", "alice", "b\x00"), "QQ" * 600]
)
def test_a_cursor_that_is_not_one_is_a_422_naming_after_and_the_fix(
    client: TestClient, alice: dict[str, str], after: str
) -> None:
    r = client.get(f"/v1/usage?by=batch&after={after}", headers=alice)
    assert_problem(r, 422, "after")
    assert r.json()["errors"][0]["field"] == "after"
    if len(after) <= 1000:  # longer: refused by the query's max_length, before the report reads it
        assert_problem(r, 422, "next_after", "leave `after` out for the first page")


def test_a_cursor_of_a_report_by_day_is_refused_by_a_report_by_batch(
    client: TestClient, api_settings: Settings, alice: dict[str, str]
) -> None:
    fill_usage_rollup(api_settings, {"alice": 3}, images=2, gpu_s=1.5)
    r = client.get(f"/v1/usage?by=batch&after={forged('day', 'alice', '2026-12-01')}", headers=alice)
    assert_problem(r, 422, "after", "by=batch")
