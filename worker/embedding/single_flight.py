"""Single flight: on a full miss one worker of the fleet encodes an image, the others wait for it.

A short Redis lock per image (SET NX PX) says who encodes; a holder that dies frees its lock
at the TTL. The waiters poll the published entries with a growing delay, bounded by `wait_s`,
past which they encode themselves rather than fail the job. Without Redis every lock counts
as taken: each worker encodes what it misses.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from typing import Final, TypeVar

from redis import Redis, RedisError

from shared.cache_stats import CacheStats
from worker.embedding.redis_health import RedisHealth

log = logging.getLogger(__name__)

FIRST_POLL_S: Final = 0.005
MAX_POLL_S: Final = 0.1
_UNLOCK_LUA: Final = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

L = TypeVar("L")  # what the encode step needs per image (a loader of its bytes)
V = TypeVar("V")  # what it yields per image (an embedding)
Read = Callable[[list[str], CacheStats], dict[str, V]]
Encode = Callable[[dict[str, L], CacheStats], dict[str, V]]


class SingleFlight:
    """The Redis locks, one per image sha256, and the bounded wait for another worker's encode."""

    def __init__(
        self, *, redis: Redis, health: RedisHealth, lock_key: Callable[[str], str], lock_ttl_s: float, wait_s: float
    ) -> None:
        self._redis = redis
        self._health = health
        self._lock_key = lock_key
        self._lock_ttl_ms = max(1, round(lock_ttl_s * 1000))
        self._wait_s = wait_s
        self._unlock = redis.register_script(_UNLOCK_LUA)

    def run(self, missing: dict[str, L], stats: CacheStats, *, read: Read[V], encode: Encode[L, V]) -> dict[str, V]:
        """Encode what nobody else is encoding; wait (up to `wait_s`) for what others are.

        `read` returns what has been published (a Redis read); `encode` encodes and publishes.
        """
        found: dict[str, V] = {}
        pending = dict(missing)
        deadline = time.monotonic() + self._wait_s
        delay_s = FIRST_POLL_S
        while pending:
            # 1. Take the free locks (a dead holder's lock frees itself at its TTL) and encode those.
            found |= self._encode_unclaimed(pending, stats, read=read, encode=encode)
            # 2. The rest is being encoded elsewhere: collect what has been published since.
            found |= read([sha for sha in pending if sha not in found], stats)
            stats.waited += sum(1 for sha in pending if sha in found)
            pending = {sha: item for sha, item in pending.items() if sha not in found}
            if not pending:
                break
            # 3. Bounded: past `wait_s`, encode here rather than fail the job.
            if time.monotonic() >= deadline:
                log.warning("embedding cache: waited %.1f s for another worker's encode; encoding here", self._wait_s)
                found |= encode(pending, stats)
                break
            time.sleep(delay_s)
            stats.wait_s += delay_s
            delay_s = min(2 * delay_s, MAX_POLL_S)
        return found

    def _encode_unclaimed(
        self, pending: dict[str, L], stats: CacheStats, *, read: Read[V], encode: Encode[L, V]
    ) -> dict[str, V]:
        tokens = self._take_locks(list(pending), stats)
        if not tokens:
            return {}
        try:
            # Another worker may have published and unlocked between our miss and our lock.
            found = read(list(tokens), stats)
            stats.waited += len(found)
            found |= encode({sha: pending[sha] for sha in tokens if sha not in found}, stats)
        finally:
            self._release_locks(tokens)
        return found

    def _take_locks(self, shas: list[str], stats: CacheStats) -> dict[str, str]:
        """sha -> lock token for each lock taken; without Redis every lock counts as taken (token "")."""
        token = uuid.uuid4().hex
        pipe = self._redis.pipeline(transaction=False)
        for sha in shas:
            pipe.set(self._lock_key(sha), token, nx=True, px=self._lock_ttl_ms)
        try:
            taken = pipe.execute()
            self._health.ok()
        except RedisError as e:
            self._health.failed(e, stats)
            return dict.fromkeys(shas, "")
        return {sha: token for sha, ok in zip(shas, taken, strict=True) if ok}

    def _release_locks(self, tokens: dict[str, str]) -> None:
        for sha, token in tokens.items():
            if not token:
                continue
            try:  # only our own lock: after our TTL it may be someone else's
                self._unlock(keys=[self._lock_key(sha)], args=[token])
            except RedisError as e:
                log.debug("embedding cache: lock for %s not released (it expires): %s", sha, e)
