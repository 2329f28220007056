"""When a plan's slots fall: cron in the plan's time zone, stored in UTC, DST days run once."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from scheduler.plans.slots import (
    check_schedule,
    check_timezone,
    latest_slot,
    local_iso,
    next_slot,
    slots_after,
    wall_to_utc,
)
from shared.errors import InvalidInput

BERLIN = check_timezone("Europe/Berlin")


def local_slots(schedule: str, after: datetime, days: int) -> list[str]:
    return [local_iso(s, BERLIN) for s in slots_after(schedule, BERLIN, after, after + timedelta(days=days), limit=99)]


def test_a_0230_slot_on_the_spring_forward_night_runs_once_at_the_end_of_the_gap() -> None:
    assert local_slots("30 2 * * *", datetime(2026, 3, 27), days=3) == [
        "2026-03-27T02:30:00+01:00",
        "2026-03-28T02:30:00+01:00",
        "2026-03-29T03:00:00+02:00",  # 02:30 does not exist that night
    ]
    assert wall_to_utc(datetime(2026, 3, 29, 2, 30), BERLIN) == datetime(2026, 3, 29, 1, 0)


def test_a_0230_slot_on_the_fall_back_night_runs_once_at_its_first_occurrence() -> None:
    assert local_slots("30 2 * * *", datetime(2026, 10, 24), days=3) == [
        "2026-10-24T02:30:00+02:00",
        "2026-10-25T02:30:00+02:00",  # 02:30 happens twice that night; the CET one is not a slot
        "2026-10-26T02:30:00+01:00",
    ]


def test_wall_times_inside_the_gap_collapse_into_one_slot() -> None:
    after = datetime(2026, 3, 29, 0, 0)  # 01:00 CET
    found = slots_after("*/30 * * * *", BERLIN, after, after + timedelta(hours=2), limit=99)
    assert [local_iso(s, BERLIN) for s in found] == [
        "2026-03-29T01:30:00+01:00",
        "2026-03-29T03:00:00+02:00",  # 02:00, 02:30 and 03:00: one instant, one slot
        "2026-03-29T03:30:00+02:00",
        "2026-03-29T04:00:00+02:00",
    ]


def test_latest_and_next_slot_agree_with_the_slot_list() -> None:
    instant = datetime(2026, 10, 25, 1, 0)  # 02:00 CET, between the two 02:30s
    assert local_iso(latest_slot("30 2 * * *", BERLIN, instant), BERLIN) == "2026-10-25T02:30:00+02:00"
    assert local_iso(next_slot("30 2 * * *", BERLIN, instant), BERLIN) == "2026-10-26T02:30:00+01:00"
    assert latest_slot("30 2 * * *", BERLIN, datetime(2026, 3, 29, 1, 0)) == datetime(2026, 3, 29, 1, 0)


@pytest.mark.parametrize(
    ("schedule", "words"),
    [
        ("61 * * * *", "is not a cron expression"),
        ("* * * *", "has 4 fields"),
        ("0 0 * * * *", "has 6 fields"),
        ("0 0 30 2 *", "is not a cron expression"),
        ("", "write 5 fields"),
    ],
)
def test_a_bad_cron_expression_is_refused_with_the_field_and_the_fix(schedule: str, words: str) -> None:
    with pytest.raises(InvalidInput) as e:
        check_schedule(schedule)
    assert e.value.field == "schedule"
    assert words in str(e.value) and "e.g. '30 2 * * *'" in str(e.value)


def test_aliases_are_cron_expressions() -> None:
    assert check_schedule("@daily") == "@daily"
    assert check_schedule("  30   2 * * 1-5 ") == "30 2 * * 1-5"


def test_an_unknown_time_zone_is_refused() -> None:
    with pytest.raises(InvalidInput, match="`timezone` is 'Europe/Atlantis': is not a known time zone"):
        check_timezone("Europe/Atlantis")
