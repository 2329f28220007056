"""`ipab` starts like a command line: its help and a status read load no heavy library.

Each case runs `ipab.cli.main` in a fresh interpreter and lists the modules it loaded, so a
top-level import added to any command module (or to a module that a parser imports) fails
here, where before it only made every `ipab` call slower.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.db import Batch, Job, JobStatus, ensure_database, make_engine, make_session_factory

REPO = Path(__file__).resolve().parents[3]
# Never loaded by `ipab --help` or `ipab status`: the object store, the HTTP stack, the GPU stack,
# the export and image libraries.
DENIED = (
    *("boto3", "botocore", "fastapi", "starlette", "uvicorn"),
    *("torch", "diffusers", "transformers", "pyarrow", "PIL"),
)
# Nor, for the help, anything a command loads: the database, Redis, the settings, the progress bars.
DENIED_FOR_HELP = (*DENIED, "sqlalchemy", "alembic", "redis", "celery", "pydantic", "pydantic_settings", "rich")
# A status read of a database at the head: no migration tool, no Redis (no queued job), no bars.
DENIED_FOR_STATUS = (*DENIED, "alembic", "redis", "rich")

# `ipab ARGV` in this interpreter; then the top-level packages it loaded, as JSON, into the file OUT.
PROBE = """
import json, sys
from ipab import cli

out, argv = sys.argv[1], sys.argv[2:]
try:
    code = cli.main(argv)
except SystemExit as e:  # --help exits from argparse
    code = e.code
with open(out, "w") as f:
    json.dump({"code": code, "packages": sorted({name.split(".")[0] for name in sys.modules})}, f)
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
    packages = found["packages"]
    assert isinstance(packages, list)
    return sorted(set(packages) & set(denied))


def add_batch(database_url: str, name: str) -> None:
    """A batch of three finished jobs, written with the schema's own API."""
    ensure_database(database_url)
    engine = make_engine(database_url)
    with make_session_factory(engine).begin() as session:
        batch = Batch(name=name, model_set="tiny")
        session.add(batch)
        session.flush()
        session.add_all(
            Job(batch_id=batch.id, line=line, dedupe_key=f"k{line}", spec="{}", seed=line, status=status.value)
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

    assert tuple(WRITERS) == FORMATS
    assert (db.JobStatus, db.TERMINAL, db.DEFAULT_TENANT) == (
        job_status.JobStatus,
        job_status.TERMINAL,
        job_status.DEFAULT_TENANT,
    )
    assert tuple(status.value for status in db.JobStatus) == job_status.STATUSES
