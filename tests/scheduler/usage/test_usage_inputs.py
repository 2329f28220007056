"""Bad input to usage reports and quotas is refused with the field, the value and the fix: a day
that is not one, a range that ends before it starts, a limit that is not a finite number."""

from __future__ import annotations

from datetime import date

import pytest

from scheduler.usage.quotas import check_limit
from scheduler.usage.report import UsageQuery
from shared.errors import InvalidInput


def parse_error(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    """What `ipab ARGV` says as it refuses its arguments (exit 2)."""
    from ipab.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(list(argv))
    assert exited.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


@pytest.mark.parametrize("flag, value", [("--since", "12/01/2026"), ("--until", "2026-13-01")])
def test_a_day_that_is_not_one_is_refused_with_the_flag_the_value_and_the_form(
    capsys: pytest.CaptureFixture[str], flag: str, value: str
) -> None:
    error = parse_error(capsys, "usage", flag, value)
    assert f"{flag} must be a UTC day as YYYY-MM-DD, e.g. 2026-12-01" in error and repr(value) in error


def test_a_range_that_ends_before_it_starts_names_both_ends_and_the_fix() -> None:
    with pytest.raises(InvalidInput) as refused:
        UsageQuery(since=date(2026, 12, 5), until=date(2026, 12, 1))
    e = refused.value
    assert (e.field, e.value) == ("until", "2026-12-01")  # the API's query parameter, not a CLI flag
    assert "before since 2026-12-05" in str(e) and "on or after" in str(e)


@pytest.mark.parametrize(
    "flag, value, says",
    [
        ("--images-per-day", "-1", "0 or more"),
        ("--images-per-month", "1.5", "a whole number"),
        ("--gpu-seconds-per-day", "abc", "a number of seconds"),
        ("--gpu-seconds-per-month", "inf", "a number of seconds"),
        ("--gpu-seconds-per-day", "nan", "a number of seconds"),
    ],
)
def test_a_limit_that_is_not_a_count_or_a_finite_number_of_seconds_is_refused(
    capsys: pytest.CaptureFixture[str], flag: str, value: str, says: str
) -> None:
    error = parse_error(capsys, "quotas", "set", "--tenant", "acme", flag, value)
    assert flag in error and says in error and repr(value) in error


def test_an_infinite_limit_is_not_stored() -> None:
    """`inf` would read back as Infinity, which is not JSON (`ipab quotas show --json`)."""
    for bad in (float("inf"), float("nan")):
        with pytest.raises(InvalidInput, match="gpu_s_per_day"):
            check_limit("gpu_s_per_day", bad)
