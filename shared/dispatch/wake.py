"""How a dispatcher sleeps, and what wakes it: a blocking Redis call, never a poll.

A dispatcher runs inside a worker (IPAB_RECONCILE_IN_WORKERS), beside the render. At torch's
default thread count every core runs a render thread, so a thread that wakes up to poll
stalls a denoising step. An idle dispatcher therefore blocks in BLPOP on its model set's
signal list, and whoever changes its work pushes a signal:

- `wake_dispatcher` (a submission, a retry, a resume, the reconciler handing jobs back): new
  work in SQL. It also bumps the wake counter, which makes the dispatcher re-read its backlog.
- `push_signal` from `shared.queue.forget_queued` (a worker took a message): the queue has
  room, and the dispatcher tops it up from what it already read. A worker signals only when
  its take left the queue down to `refill_level` (half its depth): the dispatcher would not
  top it up for less, so it is not woken for less; or when the dispatcher asked for the next
  take (`want_signal`: new work arrived while its queue was full, and must go in at once).
  A dispatcher that keeps a deeper queue than the workers' setting (IPAB_DISPATCH_HORIZON_S)
  leaves its level in Redis (`level_key`), and the take reads it in the same round trip.

The list holds one signal at most (LPUSH, then LTRIM): signals sent while the dispatcher works
make one more round between them, and a list that nobody reads stays one item long. Signals
only shorten a wait, nothing depends on them: a dispatcher also wakes by itself to renew its
lock and at least every IPAB_DISPATCH_RESCAN_S to re-read SQL, so a lost signal (Redis
flushed, a worker of an older release) costs a delay, never a job.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Final

import redis

from shared import keys
from shared.settings import Settings

log = logging.getLogger(__name__)

SIGNAL: Final = b"1"
MIN_WAIT_S: Final = 0.01  # BLPOP waits forever on 0: a shorter wait blocks this long
WANTED_TTL_S: Final = 60  # a flag nobody clears (no take came) goes by itself
MAX_WAIT_S: Final = 5.0  # one BLPOP blocks at most this long, and at most half the client's socket timeout


def refill_room(depth: int) -> int:
    """Room a dispatcher waits for before it tops its queue up, unless new work arrived: half the
    queue's depth (one message at a depth of 1 or 2). A round then moves a few messages, and workers
    signal it only when their take leaves the queue at `refill_level`."""
    return max(1, depth // 2)


def refill_level(depth: int) -> int:
    """The queue length at or below which a worker that took a message wakes the dispatcher."""
    return depth - refill_room(depth)


def wake_key(settings: Settings, model_set: str) -> str:
    """The Redis counter that submissions bump so the dispatcher re-reads its backlog at once."""
    return settings.redis_prefix + keys.DISPATCH_WAKE_KEY.format(model_set=model_set)


def signal_key(prefix: str, model_set: str) -> str:
    """The Redis list that a model set's dispatcher blocks on."""
    return prefix + keys.DISPATCH_SIGNAL_KEY.format(model_set=model_set)


def push_signal(pipe: redis.client.Pipeline, *, prefix: str, model_set: str) -> None:
    """Queue on `pipe` the commands that wake the model set's dispatcher (one signal waits at most)."""
    key = signal_key(prefix, model_set)
    pipe.lpush(key, SIGNAL)
    pipe.ltrim(key, 0, 0)


def wake_dispatcher(*, redis_client: redis.Redis, settings: Settings, model_set: str) -> bool:
    """Tell the model set's dispatcher that new work is waiting; False when Redis does not answer.

    Best effort: the dispatcher rescans SQL every IPAB_DISPATCH_RESCAN_S anyway.
    """
    try:
        pipe = redis_client.pipeline(transaction=False)
        pipe.incr(wake_key(settings, model_set))
        push_signal(pipe, prefix=settings.redis_prefix, model_set=model_set)
        pipe.execute()
    except redis.RedisError as e:
        log.warning("could not wake the dispatcher of %s (it rescans every few seconds): %s", model_set, e)
        return False
    return True


def wanted_key(prefix: str, model_set: str) -> str:
    """The Redis flag a dispatcher with new work and a full queue sets: the next take signals it."""
    return prefix + keys.DISPATCH_WANTED_KEY.format(model_set=model_set)


def level_key(prefix: str, model_set: str) -> str:
    """The Redis value a dispatcher whose queue is deeper than IPAB_DISPATCH_DEPTH sets: the queue
    length at or below which a worker's take signals it (workers know only their own setting's)."""
    return prefix + keys.DISPATCH_LEVEL_KEY.format(model_set=model_set)


def want_signal(*, redis_client: redis.Redis, prefix: str, model_set: str) -> None:
    """Ask for a signal at the next worker's take, whatever the queue's length (new work waits)."""
    redis_client.set(wanted_key(prefix, model_set), SIGNAL, ex=WANTED_TTL_S)


def wait_for_signal(*, redis_client: redis.Redis, prefix: str, model_sets: Sequence[str], timeout_s: float) -> bool:
    """Block until one of the model sets' dispatchers is signalled, or `timeout_s`; True if signalled.

    Raises `redis.RedisError` (Redis away): the caller sleeps instead.
    """
    names = [signal_key(prefix, name) for name in model_sets]
    wait_s = min(max(timeout_s, MIN_WAIT_S), _longest_block_s(redis_client))
    return redis_client.blpop(names, timeout=wait_s) is not None


def _longest_block_s(redis_client: redis.Redis) -> float:
    """A block must end well before the client's socket timeout, which would break it as an error."""
    socket_timeout_s = redis_client.connection_pool.connection_kwargs.get("socket_timeout")
    return MAX_WAIT_S if socket_timeout_s is None else min(MAX_WAIT_S, float(socket_timeout_s) / 2)
