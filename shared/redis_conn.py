"""Redis clients, all made here: bounded timeouts, no silent retries, one clear line when Redis is away.

A Redis that refuses, or accepts and never answers, must cost a caller seconds, not
minutes: connects and replies are bounded, and redis-py's own retries (three by default,
each a full timeout) are off: the callers decide whether to retry. Each kind of caller
names its timeouts by a profile instead of spelling them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Final

import redis
import redis.asyncio
import redis.asyncio.retry
from redis.backoff import NoBackoff
from redis.retry import Retry

from shared.errors import QueueUnavailable
from shared.redact import mask_text, mask_url


@dataclass(frozen=True)
class RedisProfile:
    """How long a kind of caller waits for Redis."""

    connect_timeout_s: float
    reply_timeout_s: float
    health_check_interval_s: float = 0.0  # a long-lived client PINGs a connection idle this long before use


# A command or request: a few seconds to connect, ten for a reply.
COMMAND: Final = RedisProfile(connect_timeout_s=5.0, reply_timeout_s=10.0)
# Is it there at all (checked before a change that must not half-happen).
PING: Final = RedisProfile(connect_timeout_s=5.0, reply_timeout_s=5.0)
# A figure that only decorates an answer (a queue depth for a forecast): never worth a wait.
GLANCE: Final = RedisProfile(connect_timeout_s=2.0, reply_timeout_s=2.0)
# The API's one client, kept for hours: a request must not wait long; idle connections are checked.
API: Final = RedisProfile(connect_timeout_s=5.0, reply_timeout_s=5.0, health_check_interval_s=30.0)
# A worker's client, kept for hours: replies may carry embeddings; idle connections are checked.
WORKER: Final = RedisProfile(connect_timeout_s=5.0, reply_timeout_s=10.0, health_check_interval_s=30.0)
# A check made before every API request (the rate limit): a Redis slower than this counts as down.
LIMITER: Final = RedisProfile(connect_timeout_s=0.5, reply_timeout_s=0.5)


def connect_redis(url: str, *, profile: RedisProfile = COMMAND) -> redis.Redis:
    """A client for `url` with the profile's timeouts, that does not retry by itself."""
    return redis.Redis.from_url(
        url,
        socket_connect_timeout=profile.connect_timeout_s,
        socket_timeout=profile.reply_timeout_s,
        health_check_interval=profile.health_check_interval_s,
        retry=Retry(NoBackoff(), 0),
    )


def connect_async_redis(url: str, *, profile: RedisProfile) -> redis.asyncio.Redis:
    """An asyncio client for `url` with the profile's timeouts, that does not retry by itself:
    for what an event loop awaits on every request, where a blocking call would stall them all."""
    return redis.asyncio.Redis.from_url(
        url,
        socket_connect_timeout=profile.connect_timeout_s,
        socket_timeout=profile.reply_timeout_s,
        health_check_interval=profile.health_check_interval_s,
        retry=redis.asyncio.retry.Retry(NoBackoff(), 0),
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
    client = connect_redis(url, profile=PING)
    try:
        client.ping()
    except redis.RedisError as e:
        raise redis_unreachable(url, e) from e
    finally:
        client.close()
