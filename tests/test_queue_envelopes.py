"""Bulk-built Celery messages are the very messages `celery_envelope` builds (one format, two speeds)."""

from __future__ import annotations

import base64
import json
import uuid

from shared.messages import JobMessage, decode_message
from shared.queue import RENDER_TASK, celery_envelope, message_json, render_envelopes
from shared.spec import GenerationParams, JobSpec, Reference


def _message() -> JobMessage:
    scale = {"up": {"block_0": 1.0}}
    params = GenerationParams(prompt='a "q" 100%s\ttab \u00e9 \u2028', seed=3, ip_adapter_scale=scale)
    return JobMessage(str(uuid.uuid4()), str(uuid.uuid4()), JobSpec(params, (Reference("a" * 64, "refs/x.png"),)))


def test_render_envelopes_equal_celery_envelope_but_for_the_delivery_tag() -> None:
    m = _message()
    queue = 'render.odd%s"name'
    spec_json = json.dumps(m.spec.to_json(), separators=(",", ":"))
    text = message_json(job_id=m.job_id, batch_id=m.batch_id, spec_json=spec_json)
    fast = json.loads(render_envelopes(queue=queue, messages=[(m.job_id, text)])[0])
    slow = json.loads(celery_envelope(task=RENDER_TASK, task_id=m.job_id, queue=queue, args=[m.to_json()]))
    tags = {fast["properties"].pop("delivery_tag"), slow["properties"].pop("delivery_tag")}
    assert fast == slow
    assert len(tags) == 2 and all(str(uuid.UUID(t)) == t for t in tags)
    args = json.loads(base64.b64decode(fast["body"]))[0]
    assert decode_message(args[0]) == m
