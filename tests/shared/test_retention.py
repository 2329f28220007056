"""Retentions as people write them: parsed to seconds, bounded, refused with the field, the value and the fix."""

from __future__ import annotations

import pytest

from shared.errors import InvalidInput
from shared.retention import FOREVER, format_duration, parse_duration, resolve_retention


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1h", 3600),
        ("7d", 7 * 86400),
        ("30d", 30 * 86400),
        ("12w", 12 * 7 * 86400),
        ("1y", 365 * 86400),
        ("90m", 5400),
        (" 36H ", 36 * 3600),
        ("3600", 3600),
        (86400, 86400),
        ("3650d", 3650 * 86400),
        ("never", FOREVER),
        ("Forever", FOREVER),
    ],
)
def test_a_retention_is_read_as_people_write_it(text: str | int, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("30m", "is 30m, outside 1h .. 3650d"),  # too short: gone before most clients fetch it
        ("11y", "is 11y, outside 1h .. 3650d"),
        ("0", "is 0s, outside 1h .. 3650d"),  # no retention at all: not shown as `never`, which it is not
        ("0d", "is 0d, outside 1h .. 3650d"),
        ("7x", "write a duration such as 1h, 7d or 30d"),
        ("-1d", "write a duration such as 1h, 7d or 30d"),
        ("1.5d", "write a duration such as 1h, 7d or 30d"),
        ("", "write a duration such as 1h, 7d or 30d"),
        (True, "write a duration such as 1h, 7d or 30d"),
        (None, "write a duration such as 1h, 7d or 30d"),
    ],
)
def test_a_bad_retention_names_the_field_shows_the_value_and_says_the_fix(value: object, shown: str) -> None:
    with pytest.raises(InvalidInput) as caught:
        parse_duration(value, field="--expires-after")
    message = str(caught.value)
    assert message.startswith(f"`--expires-after` is {value!r}") and shown in message and "never" in message


def test_a_retention_of_thousands_of_digits_is_refused_as_too_long_not_a_crash() -> None:
    # int() of more than 4,300 digits raises ValueError: the API answered 500, the CLI a traceback.
    for text in ("9" * 5000, "9" * 5000 + "d", "1" + "0" * 20):
        with pytest.raises(InvalidInput) as caught:
            parse_duration(text)
        assert "is longer than 3650d" in str(caught.value) and len(str(caught.value)) < 400
    assert parse_duration("0" * 30 + "7d") == 7 * 86400  # leading zeros are no digits of its size


def test_retentions_are_shown_in_the_largest_whole_unit() -> None:
    assert [format_duration(s) for s in (3600, 86400 * 7, 86400 * 8, 5400, 365 * 86400, None, FOREVER)] == [
        "1h",
        "1w",
        "8d",
        "90m",
        "1y",
        "never",
        "never",
    ]


def test_the_first_retention_given_wins_and_never_is_kept_for_ever() -> None:
    assert resolve_retention(None, 7200, 3600) == 7200
    assert resolve_retention(FOREVER, 7200) is None  # the row said never, over the batch's 2 h
    assert resolve_retention(None, None, None) is None
