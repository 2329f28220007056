"""Run a test scenario in a network namespace that has loopback only, with a DNS server that never answers.

Tests of DNS, address filtering and SSRF must never send a packet past loopback. The namespace
is `devkit.netns`'s (the benchmarks use it too): `lo` up and checked to be the only interface,
a resolv.conf naming 127.0.0.1 bind-mounted over /etc/resolv.conf, and a UDP socket on
127.0.0.1:53 that answers no query. Here a machine that refuses namespaces skips the test, and
a scenario that fails fails it.
"""

from __future__ import annotations

from typing import Any

import pytest

from devkit import netns
from devkit.netns import GLIBC_ATTEMPTS, GLIBC_TIMEOUT_S, REPO, SILENT_NAME

__all__ = ["GLIBC_ATTEMPTS", "GLIBC_TIMEOUT_S", "REPO", "SILENT_NAME", "run_isolated"]


def run_isolated(module: str, *args: str, timeout_s: float) -> dict[str, Any]:
    """`module.main(args)` run in a loopback-only namespace; its result. Skips where namespaces are refused."""
    try:
        return netns.run_isolated(module, *args, timeout_s=timeout_s)
    except netns.NamespaceRefused as e:
        pytest.skip(f"cannot create a network namespace here: {e}")
    except RuntimeError as e:
        pytest.fail(str(e))
