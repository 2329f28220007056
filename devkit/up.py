"""`python -m devkit up`: the demo's services, left running, for trying `ipab api` and the CLI by hand.

It starts what `make demo` starts (Redis and SeaweedFS on loopback, the SQLite file and the
tiny model set under `.ipab/demo`), writes their `IPAB_*` variables to `.ipab/demo/env`
(`set -a; . .ipab/demo/env; set +a` loads them into a shell), and keeps them up until
interrupted.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any, Final

from devkit.demo import local_services
from shared.settings import load_settings
from shared.storage import ObjectStore

ENV_FILE: Final = "env"


def register(subparsers: Any) -> None:
    """Add `up`."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "up", help="start the demo's Redis, S3, SQLite and model set and keep them running"
    )
    p.add_argument("--dir", type=Path, default=Path(".ipab/demo"), help="where the demo keeps its files")
    p.set_defaults(func=_up)


def write_env(path: Path, env: dict[str, str]) -> None:
    """`NAME=value` lines, shell-quoted, readable by `set -a; . FILE`."""
    path.write_text("".join(f"{name}={shlex.quote(value)}\n" for name, value in sorted(env.items())))


def _up(args: argparse.Namespace) -> int:
    workdir: Path = args.dir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    env_path = workdir / ENV_FILE
    with local_services(load_settings(), workdir) as service_env:
        os.environ.update(service_env)
        ObjectStore.from_settings(load_settings()).ensure_bucket()
        write_env(env_path, service_env)
        print(f"services up; their variables are in {env_path}", file=sys.stderr)
        print(f"load them with: set -a; . {env_path}; set +a    (Ctrl-C here stops the services)", file=sys.stderr)
        try:
            _wait_for_a_stop_signal()
        finally:
            env_path.unlink(missing_ok=True)
    return 0


def _wait_for_a_stop_signal() -> None:
    """Block until SIGINT (Ctrl-C) or SIGTERM, so that either stops the services cleanly."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    while not stop.wait(timeout=1.0):
        pass
