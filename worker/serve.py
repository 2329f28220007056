"""`ipab worker`: a Celery worker for GPU jobs, one process per GPU, one model set."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any


def register(subparsers: Any) -> None:
    """Add `ipab worker`."""
    p: argparse.ArgumentParser = subparsers.add_parser(
        "worker", help="run a GPU worker for the configured model set (IPAB_MODEL_SET)"
    )
    p.add_argument("--name", default=None, help="worker node name (default ipab-<model set>-<pid>@<host>)")
    p.add_argument("--loglevel", default="INFO")
    p.set_defaults(func=_worker)


def _worker(args: argparse.Namespace) -> int:
    import socket

    from shared import keys
    from shared.model_set import read_model_set
    from shared.settings import load_settings, require_model_set
    from worker import observe
    from worker.preflight import check_dependencies
    from worker.tasks import EXIT_START_FAILED, make_worker_app, start_failed
    from worker.watchdog import ConsumerWatchdog

    # 1. Settings and dependencies, before Celery takes any message.
    settings = load_settings()
    name = read_model_set(require_model_set(settings)).name
    check_dependencies(settings)
    # 2. The Celery worker; a pool process that cannot start shuts it down.
    app = make_worker_app(settings)
    queues_list = [keys.render_queue(name)]
    ConsumerWatchdog(redis_url=settings.redis_url, queues=queues_list, stall_s=settings.consumer_stall_s).install()
    observe.install(model_set=name, metrics_port=settings.metrics_port)
    node = args.name or f"ipab-{name}-{os.getpid()}@{socket.gethostname()}"
    queues = ",".join(queues_list)
    app.worker_main(
        [
            *(["--quiet"] if settings.log_format == "json" else []),  # no banner: every line is JSON
            "worker",
            f"--queues={queues}",
            "--concurrency=1",
            "--pool=prefork",
            f"--hostname={node}",
            f"--loglevel={args.loglevel}",
            *_monitoring_flags(settings.celery_events),
        ]
    )
    if start_failed():
        print("ipab: error: `ipab worker` stopped: its pool process could not start (see above)", file=sys.stderr)
        return EXIT_START_FAILED
    return 0


def _monitoring_flags(events: bool) -> list[str]:
    """Gossip and mingle stay off (one worker never needs another's state); the event
    heartbeat is on with events, so that Flower shows the worker online."""
    flags = ["--without-gossip", "--without-mingle"]
    return flags if events else [*flags, "--without-heartbeat"]
