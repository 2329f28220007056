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
from shared.dispatch.wake import level_key, push_signal, wanted_key
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


def forget_queued(
    *, redis_client: redis.Redis, prefix: str, job_id: str, model_set: str | None = None, signal_at: int | None = None
) -> None:
    """A worker took the job: its message is no longer waiting in Redis.

    With `model_set`, the take also tells that model set's dispatcher that its queue has room
    (`shared.dispatch.wake`): it sleeps until then instead of polling the queue's depth;
    with `signal_at` too, only when at most that many messages are left (`refill_level`), or as
    many as the dispatcher's level key names while it keeps a deeper queue (IPAB_DISPATCH_HORIZON_S),
    or when the dispatcher asked for the next take (its flag, which the take clears).

    Plain commands in one pipeline, and the signal in a second round trip when one is due (a few
    takes in a round's worth): the Lua script that did both in one step cost Redis five times the
    CPU of its commands, for every job. Nothing needs the test and the push to be one step: a
    signal only shortens the dispatcher's wait.
    """
    queued_set = prefix + keys.QUEUED_SET
    pipe = redis_client.pipeline(transaction=False)
    pipe.srem(queued_set, job_id)
    if model_set is None:
        pipe.execute()
        return
    if signal_at is None:
        push_signal(pipe, prefix=prefix, model_set=model_set)
        pipe.execute()
        return
    pipe.get(level_key(prefix, model_set))
    pipe.llen(keys.render_queue(model_set))
    pipe.delete(wanted_key(prefix, model_set))
    _, deeper, length, wanted = pipe.execute()
    if int(length) <= max(signal_at, _as_int(deeper)) or wanted:
        signal = redis_client.pipeline(transaction=False)
        push_signal(signal, prefix=prefix, model_set=model_set)
        signal.execute()


def _as_int(value: bytes | None) -> int:
    """A count stored in Redis; 0 when absent or not a number."""
    try:
        return int(value) if value is not None else 0
    except ValueError:
        return 0


def missing_from_queue(*, redis_client: redis.Redis, prefix: str, job_ids: Sequence[str]) -> list[str]:
    """The ids among `job_ids` that have no message waiting in Redis."""
    if not job_ids:
        return []
    present = redis_client.smismember(prefix + keys.QUEUED_SET, list(job_ids))
    return [job_id for job_id, here in zip(job_ids, present, strict=True) if not here]
