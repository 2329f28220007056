"""Urgent lanes skip the queue's waiting messages: their jobs go in at its consumer end.

The dispatcher keeps a model set's queue a few messages deep (IPAB_DISPATCH_DEPTH) so that no
worker waits for it. A job pushed at the far end waits for every message already there: for an
interactive job that arrives behind a bulk backlog, a whole job duration on a busy fleet (the
queue's depth over the workers), however soon the dispatcher saw it. The policy puts the
interactive lane before every waiting bulk job anyway, so its jobs go in at the end the
workers take from (kombu's Redis transport pushes on the left and pops on the right): the next
worker that is free takes one, and what waited keeps its order. The lanes' shares stay the
policy's: the queue stays IPAB_DISPATCH_DEPTH deep and the dispatcher pushes one job, in the
policy's order, for each message taken, so over any stretch the starts follow the pushes.

FIFO among urgent jobs: each goes in just behind the last one this dispatcher pushed, if that
one still waits (LINSERT BEFORE it; one script, so no worker takes it in between); otherwise
every earlier one has been taken (workers take from the same end), and it goes in at the
end itself. A message that left out of turn (a micro-batch took it, a deletion removed it),
or a pivot another dispatcher pushed before a lock handover, costs at most a swap between two
interactive jobs, never a lost or a delayed one.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import redis

from shared import keys
from shared.dispatch.policy import INTERACTIVE_LANE
from shared.errors import QueueUnavailable
from shared.wire import render_envelopes

FRONT_LANES: Final = frozenset({INTERACTIVE_LANE})
# KEYS: the queue, the `queued` set. ARGV: the pivot ('' for none), then (message, job id) pairs
# in start order. Each message goes in just behind the pivot if it still waits, else at the
# consumer end, and becomes the next one's pivot.
_PUSH_FRONT: Final = """
local pivot = ARGV[1]
for i = 2, #ARGV, 2 do
  if pivot == '' or redis.call('LINSERT', KEYS[1], 'BEFORE', pivot, ARGV[i]) <= 0 then
    redis.call('RPUSH', KEYS[1], ARGV[i])
  end
  redis.call('SADD', KEYS[2], ARGV[i + 1])
  pivot = ARGV[i]
end
return (#ARGV - 1) / 2
"""


class QueueFront:
    """Pushes one queue's urgent messages at its consumer end, in order among themselves."""

    def __init__(self, *, redis_client: redis.Redis, queue: str, prefix: str) -> None:
        self._queue = queue
        self._queued_set = prefix + keys.QUEUED_SET
        self._push = redis_client.register_script(_PUSH_FRONT)
        self._pivot = b""  # the last message pushed here: a later one goes in behind it

    def push(self, messages: Sequence[tuple[str, str]]) -> None:
        """Push (job id, `shared.wire.message_text`) pairs, first to start first, and mark their
        jobs as present in Redis (the `queued` set), in one atomic step."""
        if not messages:
            return
        envelopes = render_envelopes(queue=self._queue, messages=messages)
        args: list[bytes | str] = [self._pivot]
        for envelope, (job_id, _) in zip(envelopes, messages, strict=True):
            args += [envelope, job_id]
        try:
            self._push(keys=[self._queue, self._queued_set], args=args)
        except redis.RedisError as e:
            raise QueueUnavailable(f"cannot enqueue on Redis ({e}); the reconciler will enqueue these jobs") from e
        self._pivot = envelopes[-1]
