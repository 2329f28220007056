"""`ipab api` tunes its process before it serves: start-up objects frozen, a short GIL switch interval,
its batch processes started."""

from __future__ import annotations

import argparse
import gc
import sys
from types import SimpleNamespace
from typing import Any

import pytest
import uvicorn

import scheduler.api.app
from scheduler.cli.serve_api import SWITCH_INTERVAL_S, cmd_api


def test_the_api_serves_with_a_switch_interval_shorter_than_pythons_default(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Any] = {}
    processes = SimpleNamespace(start=lambda: seen.setdefault("batch_processes", "started"))
    app = SimpleNamespace(state=SimpleNamespace(ctx=SimpleNamespace(batch_processes=processes)))
    monkeypatch.setattr(scheduler.api.app, "create_app", lambda settings, **_: app)
    monkeypatch.setattr(gc, "freeze", lambda: seen.setdefault("frozen", True))
    monkeypatch.setattr(uvicorn, "run", lambda app, **_: seen.setdefault("switch_s", sys.getswitchinterval()))
    before = sys.getswitchinterval()
    try:
        assert cmd_api(argparse.Namespace(host="127.0.0.1", port=0)) == 0
    finally:
        sys.setswitchinterval(before)
    assert seen == {"frozen": True, "switch_s": pytest.approx(SWITCH_INTERVAL_S), "batch_processes": "started"}
    assert SWITCH_INTERVAL_S < 0.005  # Python's default: a waiting event loop lost up to 5 ms a wake-up
