"""The lifecycle on the command line: `ipab submit --expires-after`, a row's and a grid's `expires_after`,
`ipab results` showing the expiry, `ipab delete` then `ipab janitor`, `ipab tenants set|list`. On SQLite and
PostgreSQL."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import select, update

from shared.db import Job, make_engine, make_session_factory, utcnow
from shared.jobs import transaction
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.scheduler.submission.conftest import Run, load_jobs, run_ipab, write_csv, write_jsonl, write_photos

MODULES = ("scheduler.cli.batches", "scheduler.cli.retention")


@pytest.fixture
def cli_settings(settings: Settings, tmp_path: Path, database_url: str) -> Settings:
    """References may be read from the test's folder; the test's database (SQLite, then PostgreSQL)."""
    return settings.model_copy(update={"reference_roots": [tmp_path], "database_url": database_url})


@pytest.fixture
def ipab(settings_env: Callable[[Settings], dict[str, str]], monkeypatch: pytest.MonkeyPatch) -> Callable[..., Run]:
    """`ipab(settings, *argv)`: the command in-process, on exactly these settings."""

    def run(settings: Settings, *argv: str) -> Run:
        return run_ipab(argv, env=settings_env(settings), monkeypatch=monkeypatch, modules=MODULES)

    return run


def _manifest(tmp_path: Path, extra: dict[int, dict[str, str]] | None = None) -> Path:
    photo = write_photos(tmp_path / "photos")["chelsea"]
    rows = [{"reference": str(photo), "prompt": f"p{i}", "seed": i, **(extra or {}).get(i, {})} for i in range(3)]
    return write_jsonl(tmp_path / "rows.jsonl", rows)


def _finish_all(settings: Settings) -> None:
    """As workers would, in short: every job succeeded now, expiring its retention from now."""
    from shared.jobs import expiry_on_finish

    engine = make_engine(settings.database_url)
    with transaction(make_session_factory(engine)) as session:
        session.execute(
            update(Job).values(status="succeeded", attempts=1, finished_at=utcnow(), expires_at=expiry_on_finish())
        )
    engine.dispose()


def test_submit_gives_its_retention_to_the_rows_that_name_none(
    cli_settings: Settings, tmp_path: Path, ipab: Callable[..., Run]
) -> None:
    manifest = _manifest(tmp_path, {1: {"expires_after": "never"}, 2: {"expires_after": "2h"}})

    run = ipab(cli_settings, "submit", str(manifest), "--model-set", "tiny", "--expires-after", "7d")

    assert run.code == 0, run.err
    assert [job.expires_after_s for job in load_jobs(cli_settings)] == [7 * 86400, None, 7200]


def test_a_bad_retention_stops_submit_with_one_line_naming_it(
    cli_settings: Settings, tmp_path: Path, ipab: Callable[..., Run]
) -> None:
    manifest = _manifest(tmp_path)

    with pytest.raises(SystemExit) as exited:  # argparse refuses it before anything is read
        ipab(cli_settings, "submit", str(manifest), "--model-set", "tiny", "--expires-after", "5m")
    row = ipab(
        cli_settings, "submit", str(_manifest(tmp_path / "b", {0: {"expires_after": "7 days"}})), "--model-set", "tiny"
    )

    assert exited.value.code == 2
    assert row.code == 2 and "line 1: expires_after: is '7 days'" in row.err and "1h, 7d or 30d" in row.err
    assert load_jobs(cli_settings) == []


def test_results_show_when_each_image_expires(cli_settings: Settings, tmp_path: Path, ipab: Callable[..., Run]) -> None:
    assert ipab(cli_settings, "submit", str(_manifest(tmp_path)), "--model-set", "tiny", "--batch", "b",
                "--expires-after", "1d").code == 0  # fmt: skip
    _finish_all(cli_settings)

    run = ipab(cli_settings, "results", "b")

    lines = [json.loads(line) for line in run.out.splitlines()]
    assert len(lines) == 3 and all(line["expires_at"] and line["data_removed_at"] is None for line in lines)


def test_delete_then_janitor_removes_a_batch_and_its_images(
    cli_settings: Settings, tmp_path: Path, ipab: Callable[..., Run]
) -> None:
    assert ipab(cli_settings, "submit", str(_manifest(tmp_path)), "--model-set", "tiny", "--batch", "gone").code == 0
    store = ObjectStore.from_settings(cli_settings)
    assert store.list_keys("refs/")

    deleted = ipab(cli_settings, "delete", "gone")
    swept = ipab(cli_settings, "janitor")

    assert deleted.code == 0 and "deletion of batch gone asked for: 3 job(s)" in deleted.out
    assert swept.code == 0 and "3 job(s) removed" in swept.out and "1 batch(es)" in swept.out, swept.out
    assert load_jobs(cli_settings) == [] and store.list_keys() == []  # its image: no other batch used it
    missing = ipab(cli_settings, "delete", "gone")
    assert missing.code == 2 and "BATCH|JOB" in missing.err and len(missing.err.strip().splitlines()) == 1


def test_delete_of_a_job_id_removes_that_job_alone(
    cli_settings: Settings, tmp_path: Path, ipab: Callable[..., Run]
) -> None:
    assert ipab(cli_settings, "submit", str(_manifest(tmp_path)), "--model-set", "tiny", "--batch", "b").code == 0
    _finish_all(cli_settings)
    gone, *kept = [job.id for job in load_jobs(cli_settings)]

    deleted = ipab(cli_settings, "delete", gone)
    swept = ipab(cli_settings, "janitor")

    assert deleted.code == 0 and f"deletion of job {gone} asked for: 1 job(s)" in deleted.out, deleted.err
    assert deleted.out.strip().splitlines()[-1] == gone
    assert swept.code == 0 and "1 job(s) removed" in swept.out, swept.out
    assert [job.id for job in load_jobs(cli_settings)] == kept  # its batch and the other jobs stay
    results = ipab(cli_settings, "results", "b")
    assert results.code == 0 and len(results.out.splitlines()) == 2 and gone not in results.out
    again = ipab(cli_settings, "delete", gone)
    assert again.code == 2 and "BATCH|JOB" in again.err  # done: as if it never was


def test_a_grid_gives_its_retention_to_its_cells(
    cli_settings: Settings, tmp_path: Path, ipab: Callable[..., Run]
) -> None:
    photo = write_photos(tmp_path / "photos")["coffee"]
    grid = tmp_path / "g.toml"
    grid.write_text(f'expires_after = "30d"\n[axes]\nprompts = ["a", "b"]\nreferences = ["{photo}"]\n')

    run = ipab(cli_settings, "submit", str(grid), "--model-set", "tiny")

    assert run.code == 0, run.err
    assert {job.expires_after_s for job in load_jobs(cli_settings)} == {30 * 86400}


def test_a_tenants_retention_is_set_listed_and_taken_by_its_submissions(
    cli_settings: Settings, tmp_path: Path, ipab: Callable[..., Run]
) -> None:
    assert ipab(cli_settings, "tenants", "set", "acme", "--expires-after", "30d").code == 0
    listed = ipab(cli_settings, "tenants", "list")
    run = ipab(cli_settings, "submit", str(_manifest(tmp_path)), "--model-set", "tiny", "--tenant", "acme")

    assert "acme\t30d" in listed.out
    assert run.code == 0 and {job.expires_after_s for job in load_jobs(cli_settings)} == {30 * 86400}
    assert ipab(cli_settings, "tenants", "set", "acme", "--expires-after", "fleet").code == 0
    assert "acme\tnever (fleet)" in ipab(cli_settings, "tenants", "list").out
    engine = make_engine(cli_settings.database_url)
    with make_session_factory(engine)() as session:
        assert session.scalar(select(Job.expires_after_s).limit(1)) == 30 * 86400  # a job keeps what it was given
    engine.dispose()


def _csv_manifest(folder: Path, retentions: list[str]) -> Path:
    """A CSV manifest, a row per retention (an empty cell: none named)."""
    photo = write_photos(folder / "photos")["chelsea"]
    rows = [[str(photo), f"p{i}", str(i), expires] for i, expires in enumerate(retentions)]
    return write_csv(folder / "rows.csv", ["reference", "prompt", "seed", "expires_after"], rows)


def test_a_csv_manifests_expires_after_column_gives_its_rows_their_retention(
    cli_settings: Settings, tmp_path: Path, ipab: Callable[..., Run]
) -> None:
    manifest = _csv_manifest(tmp_path, ["", "never", "2h"])

    run = ipab(cli_settings, "submit", str(manifest), "--model-set", "tiny", "--expires-after", "7d")

    assert run.code == 0, run.err
    assert [job.expires_after_s for job in load_jobs(cli_settings)] == [7 * 86400, None, 7200]


def test_a_bad_expires_after_in_a_csv_manifest_is_refused_naming_its_line_field_and_value(
    cli_settings: Settings, tmp_path: Path, ipab: Callable[..., Run]
) -> None:
    manifest = _csv_manifest(tmp_path, ["1d", "7 days"])  # the header is line 1: the bad row is line 3

    run = ipab(cli_settings, "submit", str(manifest), "--model-set", "tiny")

    assert run.code == 2 and "line 3: expires_after: is '7 days'" in run.err and "1h, 7d or 30d" in run.err, run.err
    assert load_jobs(cli_settings) == []  # refused as a whole
