"""Putting job messages into Redis as Celery task messages, many in one round trip.

Celery's `apply_async` costs a round trip (and a lot of Python) per message; a 100k-row
manifest would spend minutes there. We build the same Celery protocol-2 message that
kombu's Redis transport writes (a JSON envelope with a base64 body, pushed with LPUSH on
the queue's list) and push a whole batch with one pipeline. The consuming side is a plain
Celery worker, so the format is pinned by an end-to-end test, not by trust.
"""

from __future__ import annotations

import base64
import json
import socket
import uuid
from collections.abc import Iterable, Sequence
from typing import Any, Final

import redis

from shared import keys
from shared.errors import QueueUnavailable
from shared.messages import JobMessage

RENDER_TASK: Final = "ipab.render"
EMBED_TASK: Final = "ipab.embed"
PIPELINE_CHUNK: Final = 5000
_EMBED_CALLBACKS: Final = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_ORIGIN: Final = f"ipab-scheduler@{socket.gethostname()}"


def celery_envelope(*, task: str, task_id: str, queue: str, args: list[Any]) -> bytes:
    """A Celery protocol-2 message for kombu's Redis transport, ready for LPUSH."""
    body = json.dumps([args, {}, _EMBED_CALLBACKS], separators=(",", ":")).encode()
    headers = {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "",
        "kwargsrepr": "{}",
        "origin": _ORIGIN,
        "ignore_result": True,
    }
    envelope = {
        "body": base64.b64encode(body).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": headers,
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return json.dumps(envelope, separators=(",", ":")).encode()


def _chunks(items: Sequence[JobMessage]) -> Iterable[Sequence[JobMessage]]:
    for start in range(0, len(items), PIPELINE_CHUNK):
        yield items[start : start + PIPELINE_CHUNK]


def enqueue_jobs(*, redis_client: redis.Redis, queue: str, messages: Sequence[JobMessage], prefix: str) -> None:
    """Push render messages and mark their jobs as present in Redis, in pipelined chunks.

    The `queued` set mirrors which job ids have a message in Redis; the reconciler
    re-enqueues queued jobs missing from it (after a FLUSHALL or a restart that lost them).
    """
    queued_set = prefix + keys.QUEUED_SET
    try:
        for chunk in _chunks(messages):
            pipe = redis_client.pipeline(transaction=False)
            envelopes = [
                celery_envelope(task=RENDER_TASK, task_id=m.job_id, queue=queue, args=[m.to_json()]) for m in chunk
            ]
            pipe.lpush(queue, *envelopes)
            pipe.sadd(queued_set, *(m.job_id for m in chunk))
            pipe.execute()
    except redis.RedisError as e:
        raise QueueUnavailable(f"cannot enqueue on Redis ({e}); the reconciler will enqueue these jobs") from e


def forget_queued(*, redis_client: redis.Redis, prefix: str, job_id: str) -> None:
    """A worker took the job: its message is no longer waiting in Redis."""
    redis_client.srem(prefix + keys.QUEUED_SET, job_id)


def missing_from_queue(*, redis_client: redis.Redis, prefix: str, job_ids: Sequence[str]) -> list[str]:
    """The ids among `job_ids` that have no message waiting in Redis."""
    if not job_ids:
        return []
    present = redis_client.smismember(prefix + keys.QUEUED_SET, list(job_ids))
    return [job_id for job_id, here in zip(job_ids, present, strict=True) if not here]
