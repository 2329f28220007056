"""The Celery app, configured for GPU jobs. Built from Settings; no import-time global.

- JSON only: a pickle broker is remote code execution.
- `acks_late` + prefetch 1: a message is acknowledged only once its task returned, and a
  worker holds at most one job it has not started.
- No ack emulation in kombu's Redis transport: a message leaves Redis when a worker takes it,
  and no copy waits in kombu's `unacked` hash to be delivered again after the visibility
  timeout. SQL is what re-runs a lost job: a running one's lease expires, and a dispatched one
  whose message is gone is handed back by the reconciler (`shared.reconcile`). The copy cost
  two MULTI/EXEC pipelines per job, a third of the central Redis CPU per job
  (bench/control_plane.py). A warm shutdown still puts a reserved message back in the queue.
- soft time limit < hard time limit < IPAB_VISIBILITY_TIMEOUT_S: a dispatched job whose message
  went missing in a worker that died before starting it is handed back after that long.
- Results go to SQL, not to a Celery result backend.
- Remote control is on, so `celery -A ipab.celery_cli:app inspect active` sees the workers;
  task events (Flower) follow IPAB_CELERY_EVENTS, off by default as in Celery: they cost three
  Redis PUBLISH per job, a fifth of the central Redis CPU per job (bench/control_plane.py).
  Both ride on Redis fanout channels beside the queues and never touch a job's message.
"""

from __future__ import annotations

from celery import Celery

from shared.settings import Settings


def make_celery(settings: Settings) -> Celery:
    """A Celery app for ipab's queues on the settings' Redis."""
    app = Celery("ipab", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=False,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_tasks_per_child=None,
        task_soft_time_limit=settings.soft_time_limit_s,
        task_time_limit=settings.hard_time_limit_s,
        broker_transport_options={"visibility_timeout": settings.visibility_timeout_s, "ack_emulation": False},
        broker_connection_retry_on_startup=True,
        broker_connection_max_retries=None,
        worker_hijack_root_logger=False,
        # IPAB_CELERY_EVENTS: task events, for Flower; remote control (`celery inspect`) is always on.
        worker_send_task_events=settings.celery_events,
        task_send_sent_event=False,  # the scheduler does not send through Celery (shared/wire.py)
        worker_enable_remote_control=True,
        enable_utc=True,
    )
    return app
