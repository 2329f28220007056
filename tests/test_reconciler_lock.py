"""Only one reconciler is active at a time across the fleet; a dead holder's lock lapses."""

from __future__ import annotations

import time

import redis

from scheduler.reconcile import hold_lock


def test_one_holder_at_a_time_and_a_dead_holders_lock_lapses(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert hold_lock(redis_client=client, key="lock", holder="a", ttl_ms=300)
    assert not hold_lock(redis_client=client, key="lock", holder="b", ttl_ms=300)
    assert hold_lock(redis_client=client, key="lock", holder="a", ttl_ms=300)  # renewed by its holder
    time.sleep(0.4)  # "a" died: it renews no more
    assert hold_lock(redis_client=client, key="lock", holder="b", ttl_ms=300)
    assert not hold_lock(redis_client=client, key="lock", holder="a", ttl_ms=300)
