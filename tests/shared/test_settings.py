"""Settings: `IPAB_*` variables and `.env`, one typed object; bad values stop start-up naming the variable."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from shared.errors import SettingsError
from shared.settings import load_settings


def test_settings_come_from_ipab_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPAB_REDIS_URL", "redis://10.0.0.9:6380/2")
    monkeypatch.setenv("IPAB_DTYPE", "bfloat16")
    monkeypatch.setenv("IPAB_MAX_ATTEMPTS", "5")
    settings = load_settings()
    assert (settings.redis_url, settings.dtype, settings.max_attempts) == ("redis://10.0.0.9:6380/2", "bfloat16", 5)


def test_settings_are_read_from_a_dot_env_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("IPAB_S3_BUCKET=from-dotenv\n")
    monkeypatch.chdir(tmp_path)
    assert load_settings().s3_bucket == "from-dotenv"


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("IPAB_DTYPE", "float8"),
        ("IPAB_MAX_ATTEMPTS", "many"),
        ("IPAB_MAX_ATTEMPTS", "0"),
        ("IPAB_LEASE_S", "1"),  # not longer than the 2 s heartbeat
        ("IPAB_HARD_TIME_LIMIT_S", "99999"),  # past the visibility timeout
    ],
)
def test_a_bad_setting_is_refused_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(SettingsError, match=variable):
        load_settings()


def test_a_command_started_with_a_bad_setting_exits_with_the_variable_named(tmp_path: Path) -> None:
    env = {**os.environ, "IPAB_DTYPE": "float8"}
    done = subprocess.run(
        [sys.executable, "-m", "ipab.cli", "batches"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "IPAB_DTYPE" in done.stderr and "Traceback" not in done.stderr


def test_a_worker_without_a_model_set_refuses_to_start_naming_the_variable(tmp_path: Path) -> None:
    pytest.importorskip("diffusers", reason="`ipab worker` needs the worker extra")
    env = {k: v for k, v in os.environ.items() if k != "IPAB_MODEL_SET"}
    done = subprocess.run(
        [sys.executable, "-m", "ipab.cli", "worker"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "IPAB_MODEL_SET is not set" in done.stderr and "Traceback" not in done.stderr
