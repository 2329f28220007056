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


def test_a_bad_setting_raises_one_settings_error_naming_each_bad_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    # Every bad value of every setting, through every command: tests/shared/test_settings_table.py.
    monkeypatch.setenv("IPAB_DTYPE", "float8")
    monkeypatch.setenv("IPAB_MAX_ATTEMPTS", "many")
    with pytest.raises(SettingsError) as raised:
        load_settings()
    assert "IPAB_DTYPE" in str(raised.value) and "IPAB_MAX_ATTEMPTS" in str(raised.value)


def test_a_worker_without_a_model_set_refuses_to_start_naming_the_variable(tmp_path: Path) -> None:
    pytest.importorskip("diffusers", reason="`ipab worker` needs the worker extra")
    env = {k: v for k, v in os.environ.items() if k != "IPAB_MODEL_SET"}
    done = subprocess.run(
        [sys.executable, "-m", "ipab.cli", "worker"], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 2
    assert "IPAB_MODEL_SET is not set" in done.stderr and "Traceback" not in done.stderr
