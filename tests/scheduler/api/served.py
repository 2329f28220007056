"""A real `ipab api` process (uvicorn) for what TestClient cannot show: latency beside a load on
other connections, the process's peak memory, requests that really run at once."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

REPO = Path(__file__).resolve().parents[3]
START_S = 60.0


def free_port() -> int:
    """A TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class ServedApi:
    """`ipab api` in a process of its own (its own session, so a kill takes all of it)."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> ServedApi:
        """Start it and wait until /readyz answers 200."""
        cmd = [sys.executable, "-m", "ipab.cli", "api", "--port", str(self.port)]
        self.proc = subprocess.Popen(
            cmd, env=self.env, cwd=REPO, stdout=self.log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True
        )
        deadline = time.monotonic() + START_S
        while time.monotonic() < deadline:
            try:
                if httpx.get(self.url + "/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        pytest.fail(f"ipab api did not start\n{self.log.read_text()[-3000:]}")

    def _status_kib(self, field: str) -> int:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise AssertionError(f"no {field} in /proc/{self.proc.pid}/status")

    def rss_bytes(self) -> int:
        """The process's resident memory now."""
        return self._status_kib("VmRSS") * 1024

    def peak_rss_bytes(self) -> int:
        """The most resident memory the process has held since it started (VmHWM)."""
        return self._status_kib("VmHWM") * 1024

    def stop(self) -> None:
        """Kill it (and anything it started)."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
