"""`ipab usage` reports from the rollup (a table, JSON, CSV); `ipab quotas` sets and shows limits;
`ipab submit` over a quota stops with exit 2 and one line."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable
from datetime import date
from pathlib import Path
from typing import Final

import pytest
from PIL import Image

from shared.db import Batch, UsageRollup, ensure_database, make_engine, make_session_factory
from shared.jobs import transaction
from shared.settings import Settings
from tests.scheduler.submission.conftest import Run, run_ipab

MODULES: Final = ("scheduler.cli.batches", "scheduler.cli.usage")
DAY1, DAY2 = date(2026, 12, 1), date(2026, 12, 2)


@pytest.fixture
def ipab(
    settings: Settings, settings_env: Callable[[Settings], dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Run]:
    def run(*argv: str) -> Run:
        return run_ipab(list(argv), env=settings_env(settings), monkeypatch=monkeypatch, modules=MODULES)

    return run


def _rollup(settings: Settings) -> None:
    """Two tenants' usage over two days, two batches and two lanes."""
    ensure_database(settings.database_url)
    figures = {"pixel_steps": 4096, "queue_s": 1.0, "total_s": 3.0}
    with transaction(make_session_factory(make_engine(settings.database_url))) as session:
        session.add(Batch(id="b-1", name="posters", model_set="tiny", tenant="acme"))
        for tenant, day, batch, lane, images, gpu_s in [
            ("acme", DAY1, "b-1", "bulk", 10, 20.0),
            ("acme", DAY2, "b-1", "bulk", 5, 10.0),
            ("acme", DAY2, "b-2", "interactive", 1, 2.5),
            ("globex", DAY1, "b-3", "bulk", 7, 7.0),
        ]:
            session.add(
                UsageRollup(
                    tenant=tenant, day=day, batch_id=batch, lane=lane, model_set="tiny", jobs=images,
                    images=images, gpu_s=gpu_s, lost_gpu_s=0.5, **figures,
                )
            )  # fmt: skip


def test_usage_by_day_for_one_tenant_as_json(settings: Settings, ipab: Callable[..., Run]) -> None:
    _rollup(settings)
    run = ipab("usage", "--tenant", "acme", "--json")
    assert run.code == 0, run.err
    report = json.loads(run.out)
    assert [(r["day"], r["images"], r["gpu_seconds"]) for r in report["rows"]] == [
        ("2026-12-01", 10, 20.0),
        ("2026-12-02", 6, 12.5),
    ]
    assert report["totals"]["acme"]["images"] == 16 and report["totals"]["acme"]["lost_gpu_seconds"] == 1.5


def test_usage_by_batch_over_a_range_as_csv_names_the_batches(settings: Settings, ipab: Callable[..., Run]) -> None:
    _rollup(settings)
    run = ipab("usage", "--since", "2026-12-02", "--until", "2026-12-02", "--by", "batch", "--csv")
    assert run.code == 0, run.err
    rows = list(csv.DictReader(io.StringIO(run.out)))
    assert [(r["tenant"], r["batch"], r["batch_name"], r["images"]) for r in rows] == [
        ("acme", "b-1", "posters", "5"),
        ("acme", "b-2", "", "1"),  # a batch deleted since keeps its usage
    ]


def test_usage_by_lane_as_a_table_with_totals(settings: Settings, ipab: Callable[..., Run]) -> None:
    _rollup(settings)
    run = ipab("usage", "--by", "lane")
    assert run.code == 0, run.err
    lines = [line.split("\t") for line in run.out.strip().splitlines()]
    assert lines[0] == ["tenant", "lane", "jobs", "images", "gpu_seconds", "lost_gpu_seconds", "pixel_steps"]
    assert ["acme", "bulk", "15", "15", "30.0", "1.0", "8192"] in lines
    assert ["globex", "total", "7", "7", "7.0", "0.5", "4096"] in lines


def test_a_bad_date_is_refused_naming_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    from ipab.cli import build_parser

    with pytest.raises(SystemExit) as exited:
        build_parser().parse_args(["usage", "--since", "12/01/2026"])
    assert exited.value.code == 2 and "--since must be a UTC day as YYYY-MM-DD" in capsys.readouterr().err


def test_quotas_set_show_and_a_refused_submit(settings: Settings, ipab: Callable[..., Run], tmp_path: Path) -> None:
    assert ipab("quotas", "set", "--tenant", "acme", "--images-per-day", "2", "--max-running", "4").code == 0
    run = ipab("quotas", "set", "--tenant", "acme", "--max-running", "none")
    assert run.code == 0 and "images_per_day=2" in run.out and "max_running=none" in run.out
    shown = json.loads(ipab("quotas", "show", "--json").out)
    assert shown["acme"]["images_per_day"]["limit"] == 2 and shown["acme"]["max_running"]["limit"] is None

    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "ref.png")
    manifest = tmp_path / "rows.jsonl"
    manifest.write_text("".join(json.dumps({"reference": "ref.png", "prompt": f"p{i}"}) + "\n" for i in range(3)))
    run = ipab("submit", str(manifest), "--model-set", "tiny", "--tenant", "acme")
    assert run.code == 2
    errors = [line for line in run.err.splitlines() if line.startswith("ipab: error:")]  # after the progress lines
    assert errors == [run.err.strip().splitlines()[-1]]
    assert errors[0].startswith("ipab: error: tenant 'acme' is at its quota images_per_day = 2 images: 0 used, 3 more")

    assert "cleared" in ipab("quotas", "clear", "--tenant", "acme").out
    assert ipab("submit", str(manifest), "--model-set", "tiny", "--tenant", "acme").code == 0
