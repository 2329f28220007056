"""Run a scenario in a network namespace that has loopback only, with a DNS server that never answers.

Tests of DNS, address filtering and SSRF must never send a packet past loopback. So the test
re-runs this module under `unshare -n -m` (a new network and mount namespace): here `lo` is
brought up, the namespace is checked to hold no other interface, a resolv.conf naming
127.0.0.1 is bind-mounted over /etc/resolv.conf (private to the mount namespace), and a UDP
socket on 127.0.0.1:53 reads every query and answers none. Then the scenario module's
`main(args) -> dict` runs, and its result is printed as the last line of stdout (JSON).

`/etc/hosts` still answers `localhost`: a name that resolves at once, beside names that hang.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[3]
# glibc's own wait per query, and its tries: the C library gives up on a silent server after
# about GLIBC_TIMEOUT_S * GLIBC_ATTEMPTS seconds (its defaults, 5 s and 2).
GLIBC_TIMEOUT_S = 5
GLIBC_ATTEMPTS = 2
SILENT_NAME = "hooks.silent.test"


def run_isolated(module: str, *args: str, timeout_s: float) -> dict[str, Any]:
    """`module.main(args)` run in a loopback-only namespace; its result. Skips where namespaces are refused."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs util-linux `unshare` to isolate the network")
    prefix = [unshare, "-n", "-m"] if os.geteuid() == 0 else [unshare, "-n", "-m", "-r"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {probe.stderr.strip()}")
    argv = [*prefix, sys.executable, "-m", "tests.scheduler.webhooks.netns", module, *args]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout_s)
    if done.returncode != 0 or not done.stdout.strip():
        pytest.fail(f"the isolated scenario failed ({done.returncode}):\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _isolate_network() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    names = [name for _, name in socket.if_nameindex()]
    if names != ["lo"]:
        raise SystemExit(f"refusing to run: the namespace has interfaces {names}, not loopback alone")


def _point_resolver_at_loopback() -> None:
    folder = Path(tempfile.mkdtemp(prefix="ipab-netns-"))
    conf = folder / "resolv.conf"
    conf.write_text(f"nameserver 127.0.0.1\noptions timeout:{GLIBC_TIMEOUT_S} attempts:{GLIBC_ATTEMPTS}\n")
    subprocess.run(["mount", "--bind", str(conf), "/etc/resolv.conf"], check=True)


def _silent_dns() -> None:
    """Read DNS queries on 127.0.0.1:53 forever, answering none."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 53))

    def swallow() -> None:
        while True:
            sock.recvfrom(4096)

    threading.Thread(target=swallow, name="silent-dns", daemon=True).start()


def main(argv: list[str]) -> None:
    """Isolate, then run the scenario module named by argv[0] with the rest of argv."""
    _isolate_network()
    _point_resolver_at_loopback()
    _silent_dns()
    scenario = importlib.import_module(argv[0])
    result = scenario.main(argv[1:])
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
