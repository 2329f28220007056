"""Putting job messages into Redis, many in one round trip, and tracking which are there.

Celery's `apply_async` costs a round trip (and a lot of Python) per message; a 100k-row
manifest would spend minutes there. The codec (`shared.wire`) builds the very Celery
messages kombu's Redis transport writes; here they are pushed with LPUSH, a whole batch
per pipeline. The `queued` set mirrors which job ids have a message waiting, so the
reconciler can re-enqueue jobs whose message was lost.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import redis

from shared import keys
from shared.dispatch.wake import SIGNAL, level_key, push_signal, signal_key, wanted_key
from shared.errors import QueueUnavailable
from shared.wire import render_envelopes

PIPELINE_CHUNK: Final = 5000


def enqueue_serialized(
    *, redis_client: redis.Redis, queue: str, messages: Sequence[tuple[str, str]], prefix: str
) -> None:
    """Push render messages, (job id, message JSON text from `shared.wire.message_text`) pairs, and
    mark their jobs as present in Redis, in pipelined chunks.

    The `queued` set mirrors which job ids have a message in Redis; the reconciler hands back
    to the dispatcher the dispatched jobs missing from it (after a FLUSHALL or a lost restart).
    """
    queued_set = prefix + keys.QUEUED_SET
    try:
        for start in range(0, len(messages), PIPELINE_CHUNK):
            chunk = messages[start : start + PIPELINE_CHUNK]
            pipe = redis_client.pipeline(transaction=False)
            pipe.lpush(queue, *render_envelopes(queue=queue, messages=chunk))
            pipe.sadd(queued_set, *(job_id for job_id, _ in chunk))
            pipe.execute()
    except redis.RedisError as e:
        raise QueueUnavailable(f"cannot enqueue on Redis ({e}); the reconciler will enqueue these jobs") from e


# The job's id leaves the queued set; the dispatcher's signal list gets its one signal only when
# the render queue is down to the given length (or the higher one a dispatcher that deepened its
# queue left in its level key), or the dispatcher asked for the next take (its flag is cleared):
# the test and the push are one step in Redis.
_FORGET_AND_SIGNAL: Final = b"""
redis.call('SREM', KEYS[1], ARGV[1])
local level = tonumber(ARGV[2])
local deeper = tonumber(redis.call('GET', KEYS[5]))
if deeper and deeper > level then level = deeper end
if redis.call('LLEN', KEYS[2]) <= level or redis.call('DEL', KEYS[4]) == 1 then
  redis.call('LPUSH', KEYS[3], ARGV[3])
  redis.call('LTRIM', KEYS[3], 0, 0)
end
"""


def forget_queued(
    *, redis_client: redis.Redis, prefix: str, job_id: str, model_set: str | None = None, signal_at: int | None = None
) -> None:
    """A worker took the job: its message is no longer waiting in Redis.

    With `model_set`, the same round trip tells that model set's dispatcher that its queue has
    room (`shared.dispatch.wake`): it sleeps until then instead of polling the queue's depth;
    with `signal_at` too, only when at most that many messages are left (`refill_level`), or as
    many as the dispatcher's level key names while it keeps a deeper queue (IPAB_DISPATCH_HORIZON_S).
    """
    queued_set = prefix + keys.QUEUED_SET
    if model_set is not None and signal_at is not None:
        script = redis_client.register_script(_FORGET_AND_SIGNAL)
        keys_ = [
            queued_set,
            keys.render_queue(model_set),
            signal_key(prefix, model_set),
            wanted_key(prefix, model_set),
            level_key(prefix, model_set),
        ]
        script(keys=keys_, args=[job_id, signal_at, SIGNAL])
        return
    pipe = redis_client.pipeline(transaction=False)
    pipe.srem(queued_set, job_id)
    if model_set is not None:
        push_signal(pipe, prefix=prefix, model_set=model_set)
    pipe.execute()


def missing_from_queue(*, redis_client: redis.Redis, prefix: str, job_ids: Sequence[str]) -> list[str]:
    """The ids among `job_ids` that have no message waiting in Redis."""
    if not job_ids:
        return []
    present = redis_client.smismember(prefix + keys.QUEUED_SET, list(job_ids))
    return [job_id for job_id, here in zip(job_ids, present, strict=True) if not here]
