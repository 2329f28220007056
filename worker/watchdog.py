"""A watchdog for a known Celery-on-Redis failure: the consumer wedges after a reconnect.

After Redis restarts, a Celery worker may reconnect and then never take another message
(celery#8030, #9054, #10205): the queue fills while the worker idles. SQL still knows
every job, so nothing is lost, but nothing runs either. The watchdog notices the wedge
(messages waiting, this worker idle, nothing received for `consumer_stall_s`) and asks
Celery for a warm restart (SIGHUP: the worker re-executes itself with the same command).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Sequence

import redis
from celery.signals import task_received, worker_ready
from celery.worker import state

from shared.redis_conn import PING, connect_redis

log = logging.getLogger(__name__)


class ConsumerWatchdog:
    """Restarts this worker when its queues hold messages that it has stopped taking."""

    def __init__(self, *, redis_url: str, queues: Sequence[str], stall_s: float) -> None:
        self._redis_url = redis_url
        self._queues = list(queues)
        self._stall_s = stall_s
        self._last_activity = time.monotonic()
        self._stop = threading.Event()

    def install(self) -> None:
        """Start watching once the worker is ready (in the worker's main process)."""
        task_received.connect(self._on_received, weak=False)
        worker_ready.connect(lambda **_: self._start(), weak=False)

    def _on_received(self, **_: object) -> None:
        self._last_activity = time.monotonic()

    def _start(self) -> None:
        self._last_activity = time.monotonic()
        threading.Thread(target=self._watch, name="consumer-watchdog", daemon=True).start()

    def wedged(self, waiting: int) -> bool:
        """Messages are waiting, nothing runs here, and nothing arrived for `stall_s`."""
        if state.active_requests or state.reserved_requests:
            self._last_activity = time.monotonic()
            return False
        return waiting > 0 and time.monotonic() - self._last_activity > self._stall_s

    def _waiting(self, client: redis.Redis) -> int:
        return sum(int(client.llen(q)) for q in self._queues)

    def _watch(self) -> None:
        client = connect_redis(self._redis_url, profile=PING)
        while not self._stop.wait(min(5.0, self._stall_s / 2)):
            try:
                waiting = self._waiting(client)
            except redis.RedisError:
                self._last_activity = time.monotonic()  # Redis is down: not a wedge (yet)
                continue
            if self.wedged(waiting):
                log.error(
                    "consumer wedged: %d message(s) waiting, none received for %.0f s; restarting the worker",
                    waiting,
                    self._stall_s,
                )
                self._stop.set()
                os.kill(os.getpid(), signal.SIGHUP)
