"""schemathesis against a real `ipab api` process's /openapi.json: no input gets a 5xx.

Bounded: few examples per operation, a fixed seed, a time budget; the coverage, fuzzing and
stateful phases all run. The server's log is checked too, so a 500 that schemathesis did
not report still fails the test.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Final

import pytest

from shared.settings import Settings
from tests.scheduler.api.conftest import make_key
from tests.scheduler.api.served import ServedApi

pytestmark = pytest.mark.slow

MAX_EXAMPLES: Final = 10
SEED: Final = 1
BUDGET_S: Final = 60
UNEXPECTED: Final = "unexpected error on"  # what the API logs for any 500 (scheduler/api/problems.py)


def _options(key: str) -> list[str]:
    return [
        *("--header", f"Authorization: Bearer {key}", "--checks", "not_a_server_error"),
        *("--max-examples", str(MAX_EXAMPLES), "--seed", str(SEED), "--max-time", str(BUDGET_S)),
        *("--request-timeout", "30", "--continue-on-failure", "--workers", "1", "--no-color"),
    ]


def test_no_generated_request_gets_a_server_error(
    settings: Settings, settings_env: Callable[[Settings], dict[str, str]], tmp_path: Path
) -> None:
    model_set = tmp_path / "model-set.toml"
    model_set.write_text('name = "tiny"\nbase = "b"\nip_adapter = "a.safetensors"\nimage_encoder = "e"\n')
    settings = settings.model_copy(update={"model_set": model_set})
    key, _ = make_key(settings, "fuzz")
    server = ServedApi({**os.environ, **settings_env(settings), "OMP_NUM_THREADS": "1"}, tmp_path / "api.log")
    server.start()
    try:
        run = subprocess.run(
            [str(Path(sys.executable).with_name("st")), "run", f"{server.url}/openapi.json", *_options(key)],
            cwd=tmp_path,  # its example database (.schemathesis/) stays out of the repository
            capture_output=True,
            text=True,
            timeout=BUDGET_S + 120,
        )
    finally:
        server.stop()
    log = (tmp_path / "api.log").read_text()
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    assert UNEXPECTED not in log, log[-6000:]
