"""The control-plane loops stop cleanly on SIGTERM (a container's PID 1 would otherwise ignore it)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from shared.settings import Settings


def catches(pid: int, signum: int) -> bool:
    """Whether process `pid` has a handler for `signum` (the SigCgt mask of /proc/PID/status)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) & (1 << (signum - 1)))
    return False


def wait_until_it_catches_sigterm(proc: subprocess.Popen[str], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not catches(proc.pid, signal.SIGTERM):
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        assert time.monotonic() < deadline, f"no SIGTERM handler after {timeout_s} s"
        time.sleep(0.05)


@pytest.mark.parametrize("argv", [("reconcile", "--loop"), ("beat", "--interval", "1")])
def test_a_control_loop_exits_zero_soon_after_sigterm(
    argv: tuple[str, ...], settings: Settings, settings_env: Callable[[Settings], dict[str, str]], tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPAB_")}
    env.update(settings_env(settings))
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipab.cli", *argv], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    wait_until_it_catches_sigterm(proc)  # its first line ran (a fixed sleep was too short on a loaded machine)
    time.sleep(2)  # and past start-up, looping
    assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=30)
    assert code == 0, proc.stderr.read() if proc.stderr else ""
    assert time.monotonic() - t0 < 10
