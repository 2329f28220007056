"""Operator commands on live batches: `ipab cancel`, `ipab retry`, `ipab reconcile`."""

from __future__ import annotations

import argparse
import threading
from typing import Any

import redis
from sqlalchemy.orm import Session, sessionmaker

from scheduler.commands import database, find_batch
from shared.db import Batch
from shared.jobs import cancel_jobs, retry_failed, transaction
from shared.reconcile import reconcile_once, run_reconciler
from shared.redis_conn import connect_redis, require_redis
from shared.settings import Settings, load_settings


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
    p = subparsers.add_parser("reconcile", help="re-enqueue lost jobs and expire dead leases (once, or --loop)")
    p.add_argument("--loop", action="store_true", help="keep reconciling every IPAB_RECONCILE_INTERVAL_S")
    p.set_defaults(func=_reconcile)


def _redis(settings: Settings) -> redis.Redis:
    # Checked before any SQL change: `retry --failed` must not half-happen when Redis is away.
    require_redis(settings.redis_url)
    return connect_redis(settings.redis_url)


def _batch(sessions: sessionmaker[Session], ref: str) -> Batch:
    with transaction(sessions) as session:
        return find_batch(session=session, ref=ref)


def _cancel(args: argparse.Namespace) -> int:
    with database(load_settings()) as sessions:
        batch = _batch(sessions, args.batch)
        count = cancel_jobs(sessions=sessions, batch_id=batch.id, job_ids=args.job)
    print(f"canceled {count} job(s) of batch {batch.name}; running ones stop within IPAB_HEARTBEAT_S")
    return 0


def _retry(args: argparse.Namespace) -> int:
    settings = load_settings()
    redis_client = _redis(settings)
    with database(settings) as sessions:
        batch = _batch(sessions, args.batch)
        ids = retry_failed(sessions=sessions, batch_id=batch.id)
        report = reconcile_once(sessions=sessions, redis_client=redis_client, settings=settings)
    print(f"re-queued {len(ids)} failed job(s) of batch {batch.name}; {len(report.reenqueued)} enqueued")
    return 0


def _reconcile(args: argparse.Namespace) -> int:
    settings = load_settings()
    redis_client = _redis(settings)
    with database(settings) as sessions:
        if args.loop:
            run_reconciler(sessions=sessions, redis_client=redis_client, settings=settings, stop=threading.Event())
            return 0
        report = reconcile_once(sessions=sessions, redis_client=redis_client, settings=settings)
    print(
        f"{len(report.requeued_expired)} lease(s) expired and re-queued, {len(report.failed_lost)} failed "
        f"after {settings.max_attempts} attempts, {len(report.reenqueued)} re-enqueued"
    )
    return 0
