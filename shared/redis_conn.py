"""Redis clients for commands: bounded timeouts, no silent retries, one clear line when Redis is away.

A Redis that refuses, or accepts and never answers, must cost a command seconds, not
minutes: connects and replies are bounded, and redis-py's own retries (three by default,
each a full timeout) are off: the callers decide whether to retry.
"""

from __future__ import annotations

from typing import Final

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.errors import QueueUnavailable
from shared.redact import mask_text, mask_url

REDIS_CONNECT_TIMEOUT_S: Final = 5.0
REDIS_COMMAND_TIMEOUT_S: Final = 10.0
REDIS_PING_TIMEOUT_S: Final = 5.0


def connect_redis(url: str, *, socket_timeout_s: float = REDIS_COMMAND_TIMEOUT_S) -> redis.Redis:
    """A client for `url` whose connects and replies time out, and that does not retry by itself."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
        socket_timeout=socket_timeout_s,
        retry=Retry(NoBackoff(), 0),
    )


def redis_unreachable(url: str, error: BaseException) -> QueueUnavailable:
    """The error for a Redis at `url` that failed with `error`: names the variable, URL masked."""
    reason = mask_text(str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__)
    return QueueUnavailable(
        f"Redis at IPAB_REDIS_URL={mask_url(url)} cannot be reached ({reason}); "
        "check that it runs and accepts connections, or fix IPAB_REDIS_URL"
    )


def require_redis(url: str) -> None:
    """Raise `QueueUnavailable` unless the Redis at `url` answers a PING within seconds."""
    client = connect_redis(url, socket_timeout_s=REDIS_PING_TIMEOUT_S)
    try:
        client.ping()
    except redis.RedisError as e:
        raise redis_unreachable(url, e) from e
    finally:
        client.close()
