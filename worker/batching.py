"""Micro-batching: the jobs that join the one Celery delivered, taken straight from its Redis list.

A worker that received a job (one Celery message: prefetch 1, acks_late) looks at the next
messages waiting in the same queue and takes up to `IPAB_BATCH_SIZE - 1` of those that can
share its pipeline call (`compatibility_key`: same size, steps, scheduler, guidance and
adapter scale, and reference count; the model set is the queue's), waiting at most
`IPAB_BATCH_WAIT_MS` for them. It never takes an incompatible message, so the queue's order
(lanes, tenants: the dispatcher's) is kept for everything it leaves.

Why not `celery-batches` (the Celery ecosystem's batching task class): it buffers messages
in the consumer, which needs a prefetch of at least the batch size, so a busy worker would
hold N jobs it has not started (other workers idle meanwhile, and the lanes' order is lost
behind the buffer), and the consumer watchdog would see reserved requests as activity. It
groups whatever arrived, not compatible jobs, so the task would still split the buffer by
key. It is not in our dependencies either. Taking from the list ourselves keeps prefetch 1
and acks_late for the delivered message, and adds one LRANGE and one script call per batch.

No loss. A message taken here is no longer under Celery's unacked protection, so the take
(`_TAKE`, one Redis script) removes it from the list and its job id from the `queued` set
in one atomic step. SQL is the truth: until the worker claims the job it is `queued` and
dispatched with no message in Redis, which the reconciler hands back to the dispatcher
after `IPAB_REQUEUE_GRACE_S` (a worker killed between take and claim costs a delay, not a
job). Once claimed, the job has its own lease like any other: a worker killed mid-batch
lets every lease expire and the reconciler re-runs each job.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Final

import redis

from shared import keys
from shared.errors import IpabError
from shared.wire import RENDER_TASK, JobMessage, decode_envelope, decode_message

log = logging.getLogger(__name__)

POLL_S: Final = 0.005  # how often a filling batch looks at the queue again
LOOK_AHEAD: Final = 256  # messages looked at per take: the queue's consumer end, not a whole backlog
# Removes each given message from the queue's consumer end (LREM -1) and, if it was there,
# its job id from the `queued` set; returns the 1-based indexes of the pairs it took.
_TAKE: Final = """
local taken = {}
for i = 1, #ARGV, 2 do
  if redis.call('LREM', KEYS[1], -1, ARGV[i]) == 1 then
    redis.call('SREM', KEYS[2], ARGV[i + 1])
    taken[#taken + 1] = (i + 1) / 2
  end
end
return taken
"""


def compatibility_key(message: JobMessage) -> str:
    """Jobs with equal keys can share one pipeline call (the model set is the queue's)."""
    return f"{message.spec.params.batch_key()}|{len(message.spec.references)}"


@dataclass(frozen=True)
class Taken:
    """A message taken from the queue for a batch: its raw task argument and its decoded job."""

    raw: Any
    message: JobMessage


class BatchCollector:
    """Takes compatible messages from one queue, atomically with the `queued` set."""

    def __init__(self, *, redis_client: redis.Redis, queue: str, prefix: str) -> None:
        self._redis = redis_client
        self._queue = queue
        self._queued_set = prefix + keys.QUEUED_SET
        self._take = redis_client.register_script(_TAKE)

    def collect(self, first: JobMessage, *, more: int, wait_ms: int) -> list[Taken]:
        """Up to `more` messages compatible with `first`, waiting at most `wait_ms` for them.

        Redis being unreachable ends the wait with what was taken: the batch is an optimisation.
        """
        key = compatibility_key(first)
        deadline_s = time.monotonic() + wait_ms / 1000
        taken: list[Taken] = []
        try:
            while len(taken) < more:
                taken += self._take_some(key, more - len(taken), exclude=first.job_id)
                if len(taken) >= more or time.monotonic() >= deadline_s:
                    break
                time.sleep(POLL_S)
        except redis.RedisError as e:
            log.warning("batching stopped early: Redis: %s", e)
        return taken

    def _take_some(self, key: str, wanted: int, *, exclude: str) -> list[Taken]:
        """One look at the waiting messages (oldest first) and one atomic take of the compatible ones."""
        items: list[bytes] = self._redis.lrange(self._queue, -LOOK_AHEAD, -1)  # type: ignore[assignment]
        chosen: list[tuple[bytes, Taken]] = []
        for item in reversed(items):  # LPUSH puts the newest at the head; consumers pop the tail
            candidate = _compatible(item, key)
            if candidate is not None and candidate.message.job_id != exclude:
                chosen.append((item, candidate))
                if len(chosen) == wanted:
                    break
        if not chosen:
            return []
        args: list[bytes | str] = []
        for item, candidate in chosen:
            args += [item, candidate.message.job_id]
        indexes = self._take(keys=[self._queue, self._queued_set], args=args)
        return [chosen[int(i) - 1][1] for i in indexes]


def _compatible(item: bytes, key: str) -> Taken | None:
    """The item's job if it is a render message with this key; anything else stays for Celery."""
    try:
        call = decode_envelope(item)
        if call.task != RENDER_TASK or len(call.args) != 1:
            return None
        message = decode_message(call.args[0])
    except IpabError:  # not a job, or a bad spec: Celery delivers it and the runner fails it
        return None
    return Taken(raw=call.args[0], message=message) if compatibility_key(message) == key else None
