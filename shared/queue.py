"""Putting job messages into Redis as Celery task messages, many in one round trip.

Celery's `apply_async` costs a round trip (and a lot of Python) per message; a 100k-row
manifest would spend minutes there. We build the same Celery protocol-2 message that
kombu's Redis transport writes (a JSON envelope with a base64 body, pushed with LPUSH on
the queue's list) and push a whole batch with one pipeline. The consuming side is a plain
Celery worker, so the format is pinned by an end-to-end test, not by trust.
"""

from __future__ import annotations

import base64
import functools
import json
import socket
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Final

import redis

from shared import keys
from shared.errors import QueueUnavailable
from shared.messages import MESSAGE_VERSION, JobMessage

RENDER_TASK: Final = "ipab.render"
PIPELINE_CHUNK: Final = 5000
_EMBED_CALLBACKS: Final = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_ORIGIN: Final = f"ipab-scheduler@{socket.gethostname()}"
_COMPACT: Final = (",", ":")
_CALLBACKS_JSON: Final = json.dumps(_EMBED_CALLBACKS, separators=_COMPACT)
# json's own C string encoder: quotes and escapes one string, without json.dumps' overhead.
_json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii


def _envelope(*, task: str, task_id: str, queue: str, body_b64: str, delivery_tag: str) -> dict[str, Any]:
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
    return {
        "body": body_b64,
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
            "delivery_tag": delivery_tag,
        },
    }


def celery_envelope(*, task: str, task_id: str, queue: str, args: list[Any]) -> bytes:
    """A Celery protocol-2 message for kombu's Redis transport, ready for LPUSH."""
    body = json.dumps([args, {}, _EMBED_CALLBACKS], separators=_COMPACT).encode()
    envelope = _envelope(
        task=task,
        task_id=task_id,
        queue=queue,
        body_b64=base64.b64encode(body).decode(),
        delivery_tag=str(uuid.uuid4()),
    )
    return json.dumps(envelope, separators=_COMPACT).encode()


@functools.lru_cache(maxsize=64)
def _envelope_template(task: str, queue: str) -> str:
    # The envelope of `celery_envelope` with %-placeholders where each message differs,
    # so a bulk push formats one string per message instead of encoding a nested dict.
    # The body (base64) and the delivery tag (a uuid) need no JSON escaping; the task id does.
    mark = uuid.uuid4().hex  # cannot occur in a task or queue name by accident
    fields = {"task_id": f"{mark}i", "body_b64": f"{mark}b", "delivery_tag": f"{mark}t"}
    text = json.dumps(_envelope(task=task, queue=queue, **fields), separators=_COMPACT).replace("%", "%%")
    text = text.replace(f'"{fields.pop("task_id")}"', "%(task_id)s")
    for name, placeholder in fields.items():
        text = text.replace(placeholder, f"%({name})s")
    return text


def message_json(*, job_id: str, batch_id: str, spec_json: str) -> str:
    """`JobMessage(...).to_json()` as compact JSON text, from the spec already serialized."""
    return (
        f'{{"v":{MESSAGE_VERSION},"job_id":{_json_string(job_id)},'
        f'"batch_id":{_json_string(batch_id)},"spec":{spec_json}}}'
    )


def render_envelopes(*, queue: str, messages: Sequence[tuple[str, str]]) -> list[bytes]:
    """Celery render messages for (job id, message JSON text) pairs, as `celery_envelope` builds them."""
    template = _envelope_template(RENDER_TASK, queue)
    out = []
    for job_id, text in messages:
        body = f"[[{text}],{{}},{_CALLBACKS_JSON}]".encode()
        values = {
            "task_id": _json_string(job_id),
            "body_b64": base64.b64encode(body).decode(),
            "delivery_tag": str(uuid.uuid4()),
        }
        out.append((template % values).encode())
    return out


def enqueue_jobs(*, redis_client: redis.Redis, queue: str, messages: Sequence[JobMessage], prefix: str) -> None:
    """Push render messages and mark their jobs as present in Redis, in pipelined chunks.

    The `queued` set mirrors which job ids have a message in Redis; the reconciler
    re-enqueues queued jobs missing from it (after a FLUSHALL or a restart that lost them).
    """
    texts = [(m.job_id, json.dumps(m.to_json(), separators=_COMPACT)) for m in messages]
    enqueue_serialized(redis_client=redis_client, queue=queue, messages=texts, prefix=prefix)


def enqueue_serialized(
    *, redis_client: redis.Redis, queue: str, messages: Sequence[tuple[str, str]], prefix: str
) -> None:
    """`enqueue_jobs` for (job id, message JSON text) pairs, e.g. from `message_json`."""
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


def forget_queued(*, redis_client: redis.Redis, prefix: str, job_id: str) -> None:
    """A worker took the job: its message is no longer waiting in Redis."""
    redis_client.srem(prefix + keys.QUEUED_SET, job_id)


def missing_from_queue(*, redis_client: redis.Redis, prefix: str, job_ids: Sequence[str]) -> list[str]:
    """The ids among `job_ids` that have no message waiting in Redis."""
    if not job_ids:
        return []
    present = redis_client.smismember(prefix + keys.QUEUED_SET, list(job_ids))
    return [job_id for job_id, here in zip(job_ids, present, strict=True) if not here]
