"""`ipab usage` prints every row of a report however many there are, reading it a page at a time:
the table, `--csv` and `--json` (one JSON object, totals over the range) across page boundaries."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from typing import Final

import pytest

from scheduler.usage import report as usage
from shared.settings import Settings
from tests.scheduler.conftest import fill_usage_rollup
from tests.scheduler.submission.conftest import Run, run_ipab

MODULES: Final = ("scheduler.cli.usage",)
PAGE: Final = 3  # rows a read, here: the 10 rows below take four reads


@pytest.fixture
def ipab(
    settings: Settings, settings_env: Callable[[Settings], dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Run]:
    """`ipab ARGV` in this process, reading reports PAGE rows at a time."""
    monkeypatch.setattr(usage, "PAGE_ROWS", PAGE)

    def run(*argv: str) -> Run:
        return run_ipab(list(argv), env=settings_env(settings), monkeypatch=monkeypatch, modules=MODULES)

    return run


def test_json_holds_every_row_once_across_pages(settings: Settings, ipab: Callable[..., Run]) -> None:
    keys = fill_usage_rollup(settings, {"acme": 7, "globex": 3}, images=1, gpu_s=2.5)

    run = ipab("usage", "--by", "batch", "--json")

    assert run.code == 0, run.err
    report = json.loads(run.out)
    assert [(row["tenant"], row["batch"]) for row in report["rows"]] == keys
    assert (report["by"], report["tenant"], report["totals_cover"]) == ("batch", None, "range")
    assert report["totals"]["acme"]["gpu_seconds"] == 17.5 and report["totals"]["globex"]["images"] == 3


def test_json_of_an_empty_range_is_still_one_object(settings: Settings, ipab: Callable[..., Run]) -> None:
    fill_usage_rollup(settings, {"acme": 2}, images=1, gpu_s=2.5)
    run = ipab("usage", "--by", "batch", "--since", "2027-01-01", "--json")
    assert run.code == 0, run.err
    assert json.loads(run.out)["rows"] == [] and json.loads(run.out)["totals"] == {}


def test_csv_and_the_table_hold_every_row_once_across_pages(settings: Settings, ipab: Callable[..., Run]) -> None:
    keys = fill_usage_rollup(settings, {"acme": 7, "globex": 3}, images=1, gpu_s=2.5)

    as_csv = ipab("usage", "--by", "batch", "--csv")
    table = ipab("usage", "--by", "batch")

    assert as_csv.code == 0 and table.code == 0, as_csv.err + table.err
    assert [(row["tenant"], row["batch"]) for row in csv.DictReader(io.StringIO(as_csv.out))] == keys
    lines = [line.split("\t") for line in table.out.strip().splitlines()]
    assert [(line[0], line[1]) for line in lines[1:-2]] == keys
    assert lines[-2] == ["acme", "total", "7", "7", "17.5", "0.0", "70"]
    assert lines[-1] == ["globex", "total", "3", "3", "7.5", "0.0", "30"]
