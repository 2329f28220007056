"""Short-lived, bounded caches that keep SQL off the hot path of POST /v1/jobs.

What each cache may serve stale, and for how long, is part of the API's contract (README,
"HTTP API"): a revoked key keeps working for at most `AUTH_CACHE_S` on a server that used
it just before; a queue position or ETA is up to `FORECAST_CACHE_S` old. A tenant's reference
ids never change once uploaded, so that cache only bounds memory. A tenant's queued-jobs count
is never cached: a cap checked on a count read before the insert let concurrent POSTs pass it
(`scheduler.batches.limits`).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Final, Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

AUTH_CACHE_S: Final = 5.0  # a revoked key stops working within this many seconds
REFERENCE_CACHE_S: Final = 600.0
# A key found valid is looked up again (every AUTH_CACHE_S) outside its client address's budget of
# key lookups for this long: a tenant sharing an address with a client sending made-up keys stays served.
KNOWN_KEY_S: Final = 3600.0
# A queued job's (or batch's) forecast is served again for this long: the backlog counts it is made
# of are a snapshot up to a second old anyway, and a client polling its job every 50 ms made the
# forecast three quarters of the API's CPU per GET (four SQL statements and a policy simulation).
FORECAST_CACHE_S: Final = 1.0
MAX_ENTRIES: Final = 10_000


class ExpiringCache(Generic[K, V]):
    """A thread-safe map whose entries expire `ttl_s` after they were put; the oldest go first when full."""

    def __init__(
        self, *, ttl_s: float, max_entries: int = MAX_ENTRIES, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._clock = clock
        self._entries: dict[K, tuple[float, V]] = {}
        self._lock = threading.Lock()

    def get(self, key: K) -> V | None:
        """The value put under `key` less than `ttl_s` ago, else None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[0] <= self._clock():
                del self._entries[key]
                return None
            return entry[1]

    def put(self, key: K, value: V) -> None:
        """Keep `value` under `key` for `ttl_s` (nothing is kept when `ttl_s` is 0)."""
        if self.ttl_s <= 0:
            return
        with self._lock:
            self._entries.pop(key, None)
            while len(self._entries) >= self.max_entries:
                del self._entries[next(iter(self._entries))]  # dicts keep insertion order: the oldest
            self._entries[key] = (self._clock() + self.ttl_s, value)

    def update(self, key: K, change: Callable[[V], V]) -> None:
        """Replace a live entry's value with `change(value)`, keeping its expiry; nothing when none is cached."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry[0] > self._clock():
                self._entries[key] = (entry[0], change(entry[1]))

    def discard(self, key: K) -> None:
        """Forget `key`'s entry, if any."""
        with self._lock:
            self._entries.pop(key, None)

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self._entries.clear()
