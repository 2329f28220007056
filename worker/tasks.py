"""The Celery side of a worker: thin tasks over the job runner, one context per process.

Prefork with one child per GPU: the child builds its context (model set, clients,
reconciler thread) once when it starts, and every task reuses it.

A child whose context cannot be built must not take jobs: Celery only logs an exception
raised in `worker_process_init` and lets the child consume anyway. So the child records the
failure in memory shared with the parent, asks the parent to shut down (the unacked message
it may have reserved goes back to Redis) and exits; `ipab worker` then exits non-zero. A
task that still finds no context rejects its message with requeue instead of running.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import sys
import threading
from typing import Any, Final

from celery import Celery
from celery.exceptions import Reject
from celery.signals import worker_process_init, worker_process_shutdown

from shared import keys
from shared.celery_app import make_celery
from shared.dispatch.dispatcher import run_dispatcher
from shared.janitor.loop import run_janitor
from shared.model_set import read_model_set
from shared.reconcile import run_reconciler
from shared.settings import Settings, require_model_set
from shared.wire import RENDER_TASK
from worker import metrics
from worker.poison import install_poison_guard

log = logging.getLogger(__name__)


EXIT_START_FAILED: Final = 3  # a pool process could not build its context


class _Process:
    """The one context of this worker process (Celery gives tasks no other place for it)."""

    context: Any = None
    stop = threading.Event()
    # 1 once a pool process failed to start; shared across fork with the parent.
    start_failed = multiprocessing.RawValue("i", 0)


def start_failed() -> bool:
    """Whether a pool process of this worker failed to build its context (read by the parent)."""
    return bool(_Process.start_failed.value)


def require_context() -> Any:
    """The process's context; without one, the message goes back to the queue untouched."""
    if _Process.context is None:
        raise Reject("this worker process has no context (its start-up failed); requeueing the message", requeue=True)
    return _Process.context


def _start_process(settings: Settings) -> None:
    from worker.context import build_context

    if start_failed():  # a sibling already failed: do not load the models only to fail again
        os._exit(EXIT_START_FAILED)
    try:
        _Process.context = build_context(settings)
    except BaseException as e:
        _give_up(e)
    ctx = _Process.context
    if not settings.reconcile_in_workers:
        return
    # The control loops: each runs in every worker, and a Redis lock lets one of them work.
    clients = {"sessions": ctx.sessions, "redis_client": ctx.redis, "settings": settings, "stop": _Process.stop}
    threading.Thread(target=run_reconciler, kwargs=clients, name="reconciler", daemon=True).start()
    janitor = {**clients, "store": ctx.store, "observe": metrics.janitor_observed}
    threading.Thread(target=run_janitor, kwargs=janitor, name="janitor", daemon=True).start()
    model_set = ctx.renderer.name
    threading.Thread(
        target=run_dispatcher, kwargs={**clients, "model_sets": lambda: [model_set]}, name="dispatcher", daemon=True
    ).start()


def _give_up(error: BaseException) -> None:
    """Stop the whole worker: tell the parent, which exits non-zero, and leave before any job."""
    _Process.start_failed.value = 1
    print(f"ipab: error: the worker process could not start, taking no jobs: {error}", file=sys.stderr, flush=True)
    os.kill(os.getppid(), signal.SIGTERM)  # warm shutdown: a reserved message goes back to Redis
    os._exit(EXIT_START_FAILED)


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

        return run_job(require_context(), raw)

    worker_process_init.connect(lambda **_: _start_process(settings), weak=False)
    worker_process_shutdown.connect(lambda **_: _stop_process(), weak=False)
    return app
