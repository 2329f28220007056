"""Whether Redis is failing, so that an outage is warned about once and every failed call is counted.

Shared by the cache's Redis level and the single-flight locks: both degrade (go on without
Redis) rather than fail a job.
"""

from __future__ import annotations

import logging

from redis import RedisError

from shared.cache_stats import CacheStats

log = logging.getLogger(__name__)


class RedisHealth:
    """Tracks one Redis outage at a time: warns when it starts, logs when it ends."""

    def __init__(self) -> None:
        self.failing = False

    def failed(self, error: RedisError, stats: CacheStats) -> None:
        """Count a failed Redis call; warn if it is the first of an outage."""
        stats.redis_errors += 1
        if not self.failing:  # one warning per outage, not one per call
            log.warning("embedding cache: Redis failing, going on without that level: %s", error)
        self.failing = True

    def ok(self) -> None:
        """Note a Redis call that worked (ending an outage, if there was one)."""
        if self.failing:
            log.info("embedding cache: Redis is back")
        self.failing = False
