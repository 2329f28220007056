"""The Celery side of a worker: thin tasks over the job runner, one context per process.

Prefork with one child per GPU: the child builds its context (model set, clients,
reconciler thread) once when it starts, and every task reuses it.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from celery import Celery
from celery.signals import worker_process_init, worker_process_shutdown

from shared import keys
from shared.celery_app import make_celery
from shared.model_set import read_model_set
from shared.queue import RENDER_TASK
from shared.reconcile import run_reconciler
from shared.settings import Settings, require_model_set
from worker.poison import install_poison_guard

log = logging.getLogger(__name__)


class _Process:
    """The one context of this worker process (Celery gives tasks no other place for it)."""

    context: Any = None
    stop = threading.Event()


def _start_process(settings: Settings) -> None:
    from worker.context import build_context

    _Process.context = build_context(settings)
    ctx = _Process.context
    if not settings.reconcile_in_workers:
        return
    threading.Thread(
        target=run_reconciler,
        kwargs={"sessions": ctx.sessions, "redis_client": ctx.redis, "settings": settings, "stop": _Process.stop},
        name="reconciler",
        daemon=True,
    ).start()


def _stop_process() -> None:
    _Process.stop.set()
    if _Process.context is not None:
        _Process.context.close()


def make_worker_app(settings: Settings) -> Celery:
    """The Celery app with ipab's tasks, routed to the queues of the configured model set."""
    name = read_model_set(require_model_set(settings)).name
    install_poison_guard()
    app = make_celery(settings)
    app.conf.worker_proc_alive_timeout = 900.0  # loading SDXL in a new child takes a while
    app.conf.task_default_queue = keys.render_queue(name)

    @app.task(name=RENDER_TASK, ignore_result=True)
    def render(raw: Any) -> str:
        from worker.runner import run_job

        return run_job(_Process.context, raw)

    worker_process_init.connect(lambda **_: _start_process(settings), weak=False)
    worker_process_shutdown.connect(lambda **_: _stop_process(), weak=False)
    return app
