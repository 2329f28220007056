"""Only one reconciler is active at a time across the fleet; a dead or stalled holder's lock lapses."""

from __future__ import annotations

import threading
import time

import redis

from shared.reconcile import hold_lock, release_lock


def test_one_holder_at_a_time_and_a_dead_holders_lock_lapses(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert hold_lock(redis_client=client, key="lock", holder="a", ttl_ms=300)
    assert not hold_lock(redis_client=client, key="lock", holder="b", ttl_ms=300)
    assert hold_lock(redis_client=client, key="lock", holder="a", ttl_ms=300)  # renewed by its holder
    time.sleep(0.4)  # "a" died: it renews no more
    assert hold_lock(redis_client=client, key="lock", holder="b", ttl_ms=300)
    assert not hold_lock(redis_client=client, key="lock", holder="a", ttl_ms=300)


def test_a_holder_that_stalled_past_its_lease_cannot_extend_or_release_the_new_holders_lock(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    assert hold_lock(redis_client=client, key="lock", holder="stalled", ttl_ms=200)
    time.sleep(0.3)  # "stalled" is paused (GC, a swapped-out host) past its lease
    assert hold_lock(redis_client=client, key="lock", holder="new", ttl_ms=10_000)
    # It wakes up and tries to go on: no extension, no release, and the new lease is untouched.
    assert not hold_lock(redis_client=client, key="lock", holder="stalled", ttl_ms=50)
    assert not release_lock(redis_client=client, key="lock", holder="stalled")
    assert client.get("lock") == b"new"
    assert client.pttl("lock") > 5_000
    assert release_lock(redis_client=client, key="lock", holder="new")
    assert client.get("lock") is None


def test_many_contenders_racing_never_hold_the_lock_together(redis_url: str) -> None:
    inside = 0
    most_inside = 0
    acquisitions = 0
    guard = threading.Lock()

    def contend(name: str) -> None:
        nonlocal inside, most_inside, acquisitions
        client = redis.Redis.from_url(redis_url)
        for _ in range(60):
            if not hold_lock(redis_client=client, key="race", holder=name, ttl_ms=10_000):
                continue
            with guard:
                inside += 1
                acquisitions += 1
                most_inside = max(most_inside, inside)
            time.sleep(0.001)
            with guard:
                inside -= 1  # before the release, so a successor never counts us
            release_lock(redis_client=client, key="race", holder=name)

    threads = [threading.Thread(target=contend, args=(f"r{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert acquisitions > 6
    assert most_inside == 1
