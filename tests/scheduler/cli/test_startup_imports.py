"""`ipab` starts like a command line: its help and a status read load no heavy library.

Each case runs `ipab.cli.main` in a fresh interpreter and lists the modules it loaded, so a
top-level import added to any command module (or to a module that a parser imports) fails
here, where before it only made every `ipab` call slower.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from ipab import cli
from shared.db import Batch, Job, JobStatus, ensure_database, make_engine, make_session_factory
from shared.settings import Settings

REPO = Path(__file__).resolve().parents[3]
# Never loaded by `ipab --help` or `ipab status`: the object store, the HTTP stack, the GPU stack,
# the export and image libraries.
DENIED = (
    *("boto3", "botocore", "fastapi", "starlette", "uvicorn"),
    *("torch", "diffusers", "transformers", "pyarrow", "PIL"),
)
# Nor, for the help, anything a command loads: the database, Redis, the settings, the progress bars,
# the job spec and the model sets (the worker's parsers name their choices from light modules).
DENIED_FOR_HELP = (
    *DENIED,
    *("sqlalchemy", "alembic", "redis", "celery", "pydantic", "pydantic_settings", "rich"),
    *("shared.spec", "shared.model_set", "shared.model_set_rules", "worker.download"),
)
# A status read of a SQLite database at the head: no migration tool, no Redis (no queued job), no
# bars, no PostgreSQL dialect (a partial index declared with `postgresql_where=` loaded it), no job spec.
DENIED_FOR_STATUS = (
    *DENIED,
    *("alembic", "redis", "rich", "sqlalchemy.dialects.postgresql"),
    *("shared.spec", "shared.model_set", "worker.download"),
)

# `ipab ARGV` in this interpreter; then the modules it loaded, as JSON, into the file OUT.
PROBE = """
import json, sys
from ipab import cli

out, argv = sys.argv[1], sys.argv[2:]
try:
    code = cli.main(argv)
except SystemExit as e:  # --help exits from argparse
    code = e.code
with open(out, "w") as f:
    json.dump({"code": code, "modules": sorted(sys.modules)}, f)
"""


Probe = tuple[subprocess.CompletedProcess[str], dict[str, object]]


def run_probe(tmp_path: Path, database_url: str, *argv: str) -> Probe:
    """`ipab ARGV` in a fresh interpreter on `database_url`: the process, and what the probe wrote."""
    out = tmp_path / "loaded.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPAB_")}
    env.update({"IPAB_DATABASE_URL": database_url, "PYTHONPATH": str(REPO)})
    argv_all = [sys.executable, "-c", PROBE, str(out), *argv]
    done = subprocess.run(argv_all, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done, json.loads(out.read_text())


def loaded_of(found: dict[str, object], denied: tuple[str, ...]) -> list[str]:
    """The denied modules (or packages: a denied name covers its submodules) that were loaded."""
    modules = found["modules"]
    assert isinstance(modules, list)
    return sorted({name for name in denied for module in modules if f"{module}.".startswith(f"{name}.")})


SPEC = json.dumps({"params": {"prompt": "a cat"}, "references": [{"sha256": "ab" * 32, "key": "refs/cat.png"}]})


def add_batch(database_url: str, name: str) -> None:
    """A batch of three finished jobs, written with the schema's own API."""
    ensure_database(database_url)
    engine = make_engine(database_url)
    with make_session_factory(engine).begin() as session:
        batch = Batch(name=name, model_set="tiny")
        session.add(batch)
        session.flush()
        session.add_all(
            Job(batch_id=batch.id, line=line, dedupe_key=f"k{line}", spec=SPEC, seed=line, status=status.value)
            for line, status in enumerate((JobStatus.succeeded, JobStatus.succeeded, JobStatus.failed), start=1)
        )
    engine.dispose()


@pytest.mark.parametrize("argv", [("--help",), ("status", "--help")])
def test_the_help_loads_no_command_library(tmp_path: Path, sqlite_url: str, argv: tuple[str, ...]) -> None:
    done, found = run_probe(tmp_path, sqlite_url, *argv)

    assert found["code"] == 0 and "usage: ipab" in done.stdout
    assert loaded_of(found, DENIED_FOR_HELP) == []
    assert not (tmp_path / "ipab.db").exists()  # and touches no database


def test_a_status_read_loads_no_object_store_http_or_gpu_library(tmp_path: Path, sqlite_url: str) -> None:
    add_batch(sqlite_url, "nightly")

    done, found = run_probe(tmp_path, sqlite_url, "status", "nightly")

    assert found["code"] == 0
    assert "succeeded         2" in done.stdout and "failed            1" in done.stdout
    assert loaded_of(found, DENIED_FOR_STATUS) == []


def test_the_batch_list_loads_what_a_status_read_loads(tmp_path: Path, sqlite_url: str) -> None:
    add_batch(sqlite_url, "nightly")

    done, found = run_probe(tmp_path, sqlite_url, "batches")

    assert found["code"] == 0 and "nightly" in done.stdout
    assert loaded_of(found, DENIED_FOR_STATUS) == []


def test_the_results_name_their_objects_without_an_object_store_client(tmp_path: Path, sqlite_url: str) -> None:
    add_batch(sqlite_url, "nightly")

    done, found = run_probe(tmp_path, sqlite_url, "results", "nightly")

    lines = [json.loads(line) for line in done.stdout.splitlines()]
    assert found["code"] == 0 and [line["status"] for line in lines] == ["succeeded", "succeeded", "failed"]
    assert lines[0]["references"][0]["uri"].endswith("/refs/cat.png") and lines[0]["prompt"] == "a cat"
    assert loaded_of(found, DENIED_FOR_STATUS) == []  # boto3 cost `ipab results` a third of its start


def test_a_status_of_a_missing_batch_fails_in_one_line_and_stays_light(tmp_path: Path, sqlite_url: str) -> None:
    done, found = run_probe(tmp_path, sqlite_url, "status", "no-such-batch")  # a fresh database: migrated first

    assert found["code"] == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ipab: error: `BATCH` is 'no-such-batch': no batch has this name")
    assert loaded_of(found, DENIED) == []


def test_the_parsers_light_choices_are_what_the_commands_accept() -> None:
    from scheduler.export.formats import FORMATS
    from scheduler.export.run import WRITERS
    from shared import db, job_status
    from worker.commands import PRESET_NAMES
    from worker.download import PRESETS

    assert tuple(WRITERS) == FORMATS
    assert (db.JobStatus, db.TERMINAL, db.DEFAULT_TENANT) == (
        job_status.JobStatus,
        job_status.TERMINAL,
        job_status.DEFAULT_TENANT,
    )
    assert tuple(status.value for status in db.JobStatus) == job_status.STATUSES
    assert tuple(PRESETS) == PRESET_NAMES


def test_a_command_in_process_leaves_the_collector_on_and_nothing_frozen() -> None:
    frozen = gc.get_freeze_count()

    with pytest.raises(SystemExit):
        cli.main(["--help"])

    assert gc.isenabled() and gc.get_freeze_count() == frozen


def test_the_start_up_pause_of_the_collector_ends_on_time_and_in_a_forked_child() -> None:
    with cli._gc_paused(30.0, freeze=False):
        assert not gc.isenabled()
        pid = os.fork()
        if pid == 0:  # the child: the collector must be on without the parent's timer
            os._exit(0 if gc.isenabled() else 1)
        _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and gc.isenabled()

    with cli._gc_paused(0.05, freeze=False):
        deadline = time.monotonic() + 10
        while not gc.isenabled() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert gc.isenabled()  # a long-running command collects after its start


def test_a_submission_talks_to_s3_through_botocore_alone(
    tmp_path: Path, settings: Settings, settings_env: Callable[[Settings], dict[str, str]]
) -> None:
    from tests.scheduler.submission.conftest import write_jsonl, write_photos

    photo = write_photos(tmp_path / "photos")["chelsea"]
    manifest = write_jsonl(tmp_path / "rows.jsonl", [{"prompt": "a cat", "reference": str(photo), "seed": 1}])
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPAB_")}
    env.update(settings_env(settings.model_copy(update={"reference_roots": [tmp_path]})), PYTHONPATH=str(REPO))
    out = tmp_path / "loaded.json"
    argv = [
        sys.executable,
        "-c",
        PROBE,
        str(out),
        "submit",
        str(manifest),
        "--batch",
        "cats",
        "--model-set",
        "tiny-test",
    ]
    done = subprocess.run(argv, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    found = json.loads(out.read_text())

    assert found["code"] == 0, done.stderr
    assert "1 job(s) added" in done.stdout
    assert loaded_of(found, ("botocore",)) == ["botocore"]  # it uploaded the reference
    # boto3 and its transfer manager add nothing a submission calls: about 60 ms of its start.
    assert loaded_of(found, ("boto3", "s3transfer")) == []
