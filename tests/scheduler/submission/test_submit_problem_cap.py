"""`ipab submit` of a manifest with many bad rows prints the first problems and counts the rest
(a screenful, not a line per problem of a million-row file); without --skip-invalid, nothing
can be submitted past a problem, so reading stops at the listing's cap."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from shared.errors import MAX_LISTED_PROBLEMS
from shared.settings import Settings
from tests.scheduler.submission.conftest import Run, run_ipab, write_jsonl

ROWS = 300  # two problems each: no reference, a number as prompt


@pytest.fixture
def ipab(
    settings: Settings, settings_env: Callable[[Settings], dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Run]:
    def run(*argv: str) -> Run:
        return run_ipab(argv, env=settings_env(settings), monkeypatch=monkeypatch)

    return run


@pytest.fixture
def bad_manifest(tmp_path: Path) -> Path:
    return write_jsonl(tmp_path / "bad.jsonl", [{"prompt": 1}] * ROWS)


def listed(run: Run) -> int:
    return sum(line.startswith("line ") for line in run.err.splitlines())


def test_reading_stops_at_the_cap_and_says_where(ipab: Callable[..., Run], bad_manifest: Path) -> None:
    run = ipab("submit", str(bad_manifest), "--batch", "bad", "--model-set", "tiny")
    assert run.code == 2
    assert listed(run) == MAX_LISTED_PROBLEMS
    assert f"reading stopped at line {MAX_LISTED_PROBLEMS // 2}: the lines after it were not checked" in run.err
    assert "nothing submitted" in run.err.strip().splitlines()[-1]


def test_with_skip_invalid_every_row_is_read_and_the_problems_past_the_cap_are_counted(
    ipab: Callable[..., Run], bad_manifest: Path
) -> None:
    run = ipab("submit", str(bad_manifest), "--batch", "bad", "--model-set", "tiny", "--skip-invalid")
    assert run.code == 2  # no valid row at all
    assert listed(run) == MAX_LISTED_PROBLEMS
    more = 2 * ROWS - MAX_LISTED_PROBLEMS
    assert f"... and {more} more problem(s) not listed ({2 * ROWS} in {ROWS} rows)" in run.err
