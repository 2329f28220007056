"""Progress on stderr: rich bars on a terminal, plain lines elsewhere; stdout stays for results."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import update

from scheduler.terminal_progress import Reporter, rate_text
from shared.db import Job, make_engine, make_session_factory
from shared.settings import Settings
from tests.scheduler.submission.conftest import run_ipab, write_jsonl, write_photos


class Terminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_plain_lines_when_stderr_is_not_a_terminal() -> None:
    out = io.StringIO()
    reporter = Reporter(stream=out, plain_interval_s=0.0)

    with reporter.stage("export parquet", total=4) as stage:
        stage.advance(2)
        stage.advance(2)

    lines = out.getvalue().splitlines()
    assert lines[0] == "export parquet: 0/4 (0/s)"
    assert lines[1].startswith("export parquet: 2/4 (") and "/s, ETA " in lines[1]
    assert lines[-1].startswith("export parquet: 4/4 in ") and lines[-1].endswith(" s")
    assert "\x1b" not in out.getvalue()  # no escape sequences in logs


def test_a_bar_with_count_and_rate_on_a_terminal() -> None:
    out = Terminal()

    with Reporter(stream=out).stage("gallery", total=3) as stage:
        stage.advance(3)

    assert "gallery" in out.getvalue() and "3/3" in out.getvalue()


def test_a_silent_reporter_prints_nothing() -> None:
    out = io.StringIO()

    with Reporter(stream=out, enabled=False).stage("x", total=1) as stage:
        stage.advance()

    assert out.getvalue() == ""


def test_rate_and_eta_text() -> None:
    assert rate_text(10, 5.0, 30) == "2.0/s, ETA 10 s"
    assert rate_text(0, 5.0, 30) == "0/s"
    assert rate_text(500, 1.0, None) == "500/s"


def test_submit_reports_its_stages_on_stderr_and_keeps_stdout(
    settings: Settings,
    tmp_path: Path,
    settings_env: Callable[[Settings], dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    photo = write_photos(tmp_path / "photos")["astronaut"]
    rows = [{"reference": str(photo), "prompt": f"p{i}", "seed": i, "width": 64, "height": 64} for i in range(3)]
    manifest = write_jsonl(tmp_path / "m.jsonl", rows)
    env = settings_env(settings.model_copy(update={"reference_roots": [tmp_path]}))

    run = run_ipab(["submit", str(manifest), "--model-set", "tiny"], env=env, monkeypatch=monkeypatch)
    engine = make_engine(settings.database_url)
    with make_session_factory(engine).begin() as session:
        session.execute(update(Job).values(status="succeeded"))
    engine.dispose()
    watch = run_ipab(["status", run.last_line, "--watch", "--interval", "0.05"], env=env, monkeypatch=monkeypatch)

    assert run.code == 0
    for stage in ("validate: 3/3", "upload references: 1", "insert: 3/3"):  # then the dispatcher takes over
        assert stage in run.err
    assert not any(word in run.out for word in ("validate:", "insert:"))
    assert len(run.last_line) == 36  # the batch id alone on the last line, as before
    assert "3/3 done" in watch.err and "/s" in watch.err
