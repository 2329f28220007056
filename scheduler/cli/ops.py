"""Operator commands on live batches: `ipab cancel`, `retry`, `pause`, `resume`, `reconcile`.

Each imports what it runs when it runs: the parsers load no database or Redis code.
"""

from __future__ import annotations

import argparse
import contextlib
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Final

from scheduler.cli.common import database, read_batch
from scheduler.cli.stopping import stop_on_signals
from shared.errors import TransientError

if TYPE_CHECKING:
    import redis
    from sqlalchemy.orm import Session, sessionmaker

    from shared.settings import Settings

MODEL_SET_REFRESH_S: Final = 5.0


def register(subparsers: Any) -> None:
    """Add the operator commands."""
    p = subparsers.add_parser("cancel", help="cancel a batch's queued and running jobs (or only some jobs)")
    p.add_argument("batch", help="batch name or id")
    p.add_argument("--job", action="append", default=None, help="cancel only this job id (repeatable)")
    p.set_defaults(func=_cancel)
    p = subparsers.add_parser("retry", help="re-queue a batch's failed jobs")
    p.add_argument("batch", help="batch name or id")
    p.add_argument("--failed", action="store_true", required=True, help="re-queue the failed jobs")
    p.set_defaults(func=_retry)
    for name, verb in (("pause", "stop starting"), ("resume", "start again")):
        p = subparsers.add_parser(name, help=f"{verb} a batch's queued jobs (running ones finish)")
        p.add_argument("batch", help="batch name or id")
        p.set_defaults(func=_pause if name == "pause" else _resume)
    p = subparsers.add_parser("reconcile", help="re-enqueue lost jobs and expire dead leases (once, or --loop)")
    p.add_argument(
        "--loop",
        action="store_true",
        help="keep reconciling every IPAB_RECONCILE_INTERVAL_S, dispatch every model set's queued jobs and run "
        "the janitor (the control loops that workers otherwise run; set IPAB_RECONCILE_IN_WORKERS=false on them)",
    )
    p.set_defaults(func=_reconcile)


def _redis(settings: Settings) -> redis.Redis:
    from shared.redis_conn import connect_redis, require_redis

    # Checked before any SQL change: `retry --failed` must not half-happen when Redis is away.
    require_redis(settings.redis_url)
    return connect_redis(settings.redis_url)


def _cancel(args: argparse.Namespace) -> int:
    from scheduler.batches.actions import cancel, cancel_batch
    from shared.jobs import transaction
    from shared.settings import load_settings

    with database(load_settings()) as sessions:
        batch = read_batch(sessions, args.batch)
        if args.job is None:  # the whole batch, in chunks (other writers are not held up)
            canceled = cancel_batch(sessions=sessions, batch_id=batch.id)
        else:
            with transaction(sessions) as session:
                canceled = len(cancel(session=session, batch_id=batch.id, job_ids=args.job))
    print(f"canceled {canceled} job(s) of batch {batch.name}; running ones stop within IPAB_HEARTBEAT_S")
    return 0


def _retry(args: argparse.Namespace) -> int:
    from scheduler.batches.actions import wake
    from scheduler.usage.quotas import retry_within_quotas
    from shared.settings import load_settings

    settings = load_settings()
    redis_client = _redis(settings)
    with database(settings) as sessions:
        batch = read_batch(sessions, args.batch)
        ids = retry_within_quotas(sessions=sessions, batch_id=batch.id)
    wake(redis_client=redis_client, settings=settings, model_set=batch.model_set)
    print(f"re-queued {len(ids)} failed job(s) of batch {batch.name}; they start in their lane's turn")
    return 0


def _set_paused(args: argparse.Namespace, *, paused: bool) -> int:
    from scheduler.batches.actions import set_paused, wake
    from shared.settings import load_settings

    settings = load_settings()
    with database(settings) as sessions:
        batch = read_batch(sessions, args.batch)
        waiting = set_paused(sessions=sessions, batch_id=batch.id, paused=paused)
    if paused:
        print(f"paused batch {batch.name}: {waiting} queued job(s) wait; running ones finish")
        return 0
    with contextlib.suppress(TransientError):  # the dispatcher rescans every IPAB_DISPATCH_RESCAN_S anyway
        wake(redis_client=_redis(settings), settings=settings, model_set=batch.model_set)
    print(f"resumed batch {batch.name}: {waiting} queued job(s) start in their lane's turn")
    return 0


def _pause(args: argparse.Namespace) -> int:
    return _set_paused(args, paused=True)


def _resume(args: argparse.Namespace) -> int:
    return _set_paused(args, paused=False)


def _model_sets_with_work(sessions: sessionmaker[Session]) -> Callable[[], list[str]]:
    """The model sets that have queued jobs (read at most every few seconds by the dispatch loop)."""
    from shared.dispatch.dispatcher import queued_model_sets

    cache: dict[str, Any] = {"at": 0.0, "names": []}

    def names() -> list[str]:
        if time.monotonic() - cache["at"] > MODEL_SET_REFRESH_S:
            cache["names"], cache["at"] = queued_model_sets(sessions=sessions), time.monotonic()
        return list(cache["names"])

    return names


def _start_janitor(clients: dict[str, Any], stop: threading.Event) -> None:
    """The janitor's loop beside the reconciler, its metrics on IPAB_METRICS_PORT when set."""
    from prometheus_client import CollectorRegistry, start_http_server

    from shared.janitor.loop import run_janitor
    from shared.janitor.metrics import JanitorMetrics
    from shared.storage import ObjectStore

    settings: Settings = clients["settings"]
    registry = CollectorRegistry()
    metrics = JanitorMetrics(registry)
    if settings.metrics_port:
        start_http_server(settings.metrics_port, registry=registry)
    janitor = threading.Thread(
        target=run_janitor,
        kwargs={**clients, "store": ObjectStore.from_settings(settings), "stop": stop, "observe": metrics.observe},
        name="janitor",
        daemon=True,
    )
    janitor.start()


def _reconcile(args: argparse.Namespace) -> int:
    from shared.dispatch.dispatcher import run_dispatcher
    from shared.reconcile import reconcile_once, run_reconciler
    from shared.settings import load_settings

    # Before the imports and connections: a SIGTERM during start-up must still end the loop cleanly.
    stop = stop_on_signals() if args.loop else threading.Event()
    settings = load_settings()
    redis_client = _redis(settings)
    with database(settings) as sessions:
        if args.loop:
            clients: dict[str, Any] = {"sessions": sessions, "redis_client": redis_client, "settings": settings}
            dispatcher = threading.Thread(
                target=run_dispatcher,
                kwargs={**clients, "stop": stop, "model_sets": _model_sets_with_work(sessions)},
                name="dispatcher",
                daemon=True,
            )
            dispatcher.start()
            _start_janitor(clients, stop)
            run_reconciler(sessions=sessions, redis_client=redis_client, settings=settings, stop=stop)
            return 0
        report = reconcile_once(sessions=sessions, redis_client=redis_client, settings=settings)
    print(
        f"{len(report.requeued_expired)} lease(s) expired and re-queued, {len(report.failed_lost)} failed "
        f"after {settings.max_attempts} attempts, {len(report.reenqueued)} re-enqueued"
    )
    return 0
