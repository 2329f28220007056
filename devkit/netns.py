"""Run a module in a network namespace that has loopback only, with a DNS server that never answers.

Benchmarks of slow DNS must never send a packet past loopback. So `run_isolated` re-runs
this module under `unshare -n -m` (a new network and mount namespace): here `lo` is brought
up, the namespace is checked to hold no other interface, a resolv.conf naming 127.0.0.1 is
bind-mounted over /etc/resolv.conf (private to the mount namespace), and a UDP socket on
127.0.0.1:53 reads every query and answers none. Then the module's `main(args) -> dict` runs
(everything it starts, services and API included, inherits the namespace), and its result
is printed as the last line of stdout (JSON). Its stderr goes to the caller's.

`/etc/hosts` still answers `localhost`; SILENT_NAME (and any other name) is never answered.
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
from typing import Any, Final

REPO: Final = Path(__file__).resolve().parents[1]
# glibc's own wait per query, and its tries: it gives up on a silent server after about
# GLIBC_TIMEOUT_S * GLIBC_ATTEMPTS seconds.
GLIBC_TIMEOUT_S: Final = 5
GLIBC_ATTEMPTS: Final = 2
SILENT_NAME: Final = "hooks.silent.test"


class NamespaceRefused(RuntimeError):
    """Raised when this machine does not let us create a network namespace (no `unshare`, no rights)."""


def namespace_prefix() -> list[str]:
    """The command prefix that runs a program in new network and mount namespaces; raises NamespaceRefused."""
    unshare = shutil.which("unshare")
    if unshare is None:
        raise NamespaceRefused("util-linux `unshare` is not installed")
    prefix = [unshare, "-n", "-m"] if os.geteuid() == 0 else [unshare, "-n", "-m", "-r"]
    probe = subprocess.run([*prefix, "true"], capture_output=True, text=True)
    if probe.returncode != 0:
        raise NamespaceRefused(f"`{' '.join(prefix)} true` failed: {probe.stderr.strip()}")
    return prefix


def run_isolated(module: str, *args: str, timeout_s: float) -> dict[str, Any]:
    """`module.main(list(args))` run in a loopback-only namespace; its result.

    Raises NamespaceRefused where namespaces are refused, RuntimeError when the module fails.
    """
    argv = [*namespace_prefix(), sys.executable, "-m", "devkit.netns", module, *args]
    done = subprocess.run(argv, cwd=REPO, stdout=subprocess.PIPE, text=True, timeout=timeout_s)
    lines = done.stdout.strip().splitlines()
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"the isolated {module} failed (exit code {done.returncode}): {done.stdout[-3000:]}")
    result: dict[str, Any] = json.loads(lines[-1])
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
    """Isolate, then run the module named by argv[0] with the rest of argv; print its result."""
    _isolate_network()
    _point_resolver_at_loopback()
    _silent_dns()
    result = importlib.import_module(argv[0]).main(argv[1:])
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()


if __name__ == "__main__":
    main(sys.argv[1:])
