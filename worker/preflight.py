"""Before a worker takes any job: can it reach SQL, Redis and the object store?

Checked in the parent, before Celery starts consuming, each with the usual bounded retry
(IPAB_TRANSIENT_RETRIES, IPAB_RETRY_BASE_S, IPAB_RETRY_MAX_S). A dependency still
unreachable after that stops `ipab worker` with one line naming the setting to check,
instead of a worker that takes jobs it cannot run.
"""

from __future__ import annotations

import functools

import redis
from sqlalchemy.exc import InterfaceError, OperationalError

from shared.db import ensure_database
from shared.errors import DatabaseUnavailable, QueueUnavailable
from shared.redis_conn import PING, connect_redis
from shared.retry import retry_per_settings
from shared.settings import Settings
from shared.storage import ObjectStore


def check_database(settings: Settings) -> None:
    """Connect to the SQL database and bring its schema up to date."""
    try:
        ensure_database(settings.database_url)
    except (OperationalError, InterfaceError) as e:
        raise DatabaseUnavailable(
            f"SQL database unreachable: {e.orig or e}; check that it runs and IPAB_DATABASE_URL points at it"
        ) from e


def check_redis(settings: Settings) -> None:
    """PING the Redis that carries the queues."""
    client = connect_redis(settings.redis_url, profile=PING)
    try:
        client.ping()
    except redis.RedisError as e:
        raise QueueUnavailable(f"Redis unreachable: {e}; check that it runs and IPAB_REDIS_URL points at it") from e
    finally:
        client.close()


def check_object_store(settings: Settings) -> None:
    """Reach the bucket (creating it if missing); the store's error names IPAB_S3_ENDPOINT_URL."""
    ObjectStore.from_settings(settings).ensure_bucket()


def check_dependencies(settings: Settings) -> None:
    """Reach SQL, Redis and S3, retrying transient faults; raises the last `TransientError`."""
    for what, check in (("SQL database", check_database), ("Redis", check_redis), ("object store", check_object_store)):
        retry_per_settings(functools.partial(check, settings), what=f"reach the {what}", settings=settings)
