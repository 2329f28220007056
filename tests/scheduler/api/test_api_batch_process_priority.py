"""Batch processes (scheduler/api/batch_processes.py) run at a lower CPU priority than the API process,
and a temporary directory that takes no body is a 503 naming TMPDIR, not a 500."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Final

import pytest
from fastapi.testclient import TestClient

import scheduler.api.batch_processes as batch_processes
from scheduler.api.app import create_app
from scheduler.api.batch_processes import BATCH_PROCESS_NICE
from shared.settings import Settings
from tests.scheduler.api.conftest import JOB, assert_problem, job_count, upload

JSONL: Final = {"content-type": "application/jsonl"}


def _rows(ref: str, rows: int) -> str:
    return "".join(json.dumps({**JOB, "references": [ref], "seed": i}) + "\n" for i in range(rows))


def nice_of(pid: int) -> int:
    """The nice value of process `pid` (field 19 of /proc/PID/stat)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return int(fields[16])


@pytest.fixture
def child_client(api_settings: Settings) -> Iterator[TestClient]:
    """Every batch goes to one batch process."""
    settings = api_settings.model_copy(update={"api_batch_processes": 1, "api_batch_process_min_bytes": 0})
    with TestClient(create_app(settings, dispatcher=False), raise_server_exceptions=False) as client:
        yield client


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads nice values from /proc")
def test_a_batch_process_runs_niced_below_the_api_process(child_client: TestClient, alice: dict[str, str]) -> None:
    ref = upload(child_client, alice)
    r = child_client.post("/v1/batches", headers={**alice, **JSONL}, content=_rows(ref, 2))
    assert r.status_code == 202, r.text
    (child,) = multiprocessing.active_children()
    assert child.pid is not None
    assert nice_of(child.pid) == min(19, nice_of(os.getpid()) + BATCH_PROCESS_NICE)
    assert os.sched_getscheduler(child.pid) == os.SCHED_IDLE  # it gets the cores the API process leaves
    assert os.sched_getscheduler(os.getpid()) == os.SCHED_OTHER
    assert nice_of(os.getpid()) == os.nice(0)  # the API process's own priority is left as it was


def test_a_temporary_directory_that_takes_no_body_is_a_503_naming_tmpdir(
    child_client: TestClient, alice: dict[str, str], api_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    ref = upload(child_client, alice)
    monkeypatch.setattr(tempfile, "tempdir", str(Path(tempfile.gettempdir()) / "ipab-no-such-dir" / "tmp"))
    r = child_client.post("/v1/batches", headers={**alice, **JSONL}, content=_rows(ref, 3))
    assert_problem(r, 503, "temporary directory", "TMPDIR", "IPAB_API_BATCH_PROCESSES=0", "nothing of this batch")
    assert r.headers["retry-after"]
    assert "ipab-no-such-dir" not in r.text  # the server's paths are the operator's, in its log
    assert job_count(api_settings) == 0

    monkeypatch.undo()  # once the directory is fixed, batches go through again
    again = child_client.post("/v1/batches", headers={**alice, **JSONL}, content=_rows(ref, 3))
    assert again.status_code == 202, again.text
    assert job_count(api_settings) == 3


def test_a_body_the_temporary_directory_cannot_hold_leaves_no_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    class Full:
        def __init__(self, fd: int, _mode: str) -> None:
            os.close(fd)

        def __enter__(self) -> Full:
            return self

        def __exit__(self, *_: Any) -> None:
            return None

        def write(self, _data: bytes) -> int:
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fdopen", Full)
    with pytest.raises(OSError, match="No space"):
        batch_processes._spill(b"{}\n" * 10)
    assert list(tmp_path.iterdir()) == []
