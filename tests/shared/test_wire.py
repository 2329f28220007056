"""The wire codec: what ipab puts on a queue is what Celery reads, and what Celery writes ipab reads."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from celery import Celery

from shared.celery_app import make_celery
from shared.errors import InvalidInput, MessageInvalid
from shared.settings import Settings
from shared.spec import GenerationParams, JobSpec, Reference, parse_spec
from shared.wire import (
    RENDER_TASK,
    JobMessage,
    celery_envelope,
    decode_envelope,
    decode_message,
    decode_render_envelope,
    render_envelopes,
)

ODD_QUEUE = 'render.odd%s"name'


def _message(prompt: str = 'a "q" 100%s\ttab \u00e9 \u2028') -> JobMessage:
    params = GenerationParams(prompt=prompt, seed=3, ip_adapter_scale={"up": {"block_0": 1.0}})
    references = (Reference("a" * 64, "refs/x.png"), Reference("b" * 64, "refs/y.png"))
    return JobMessage(str(uuid.uuid4()), str(uuid.uuid4()), JobSpec(params, references))


def _envelope(message: JobMessage, queue: str = ODD_QUEUE) -> bytes:
    return render_envelopes(queue=queue, messages=[(message.job_id, message.to_text())])[0]


@pytest.fixture
def celery_app(redis_url: str) -> Iterator[Celery]:
    """ipab's own Celery configuration on the test's Redis database."""
    app = make_celery(Settings(_env_file=None, redis_url=redis_url))  # type: ignore[call-arg]
    yield app
    app.close()


def test_a_message_round_trips_through_its_envelope() -> None:
    message = _message()
    assert decode_render_envelope(_envelope(message)) == message
    assert decode_message(json.loads(message.to_text())) == message


def test_the_spec_text_is_what_parse_spec_reads_back() -> None:
    spec = _message().spec
    assert parse_spec(json.loads(spec.to_text())) == spec
    assert json.loads(spec.to_text())["references"][1] == {"sha256": "b" * 64, "key": "refs/y.png"}


def test_bulk_envelopes_equal_the_generic_envelope_but_for_the_delivery_tag() -> None:
    message = _message()
    fast = json.loads(_envelope(message))
    slow = json.loads(
        celery_envelope(task=RENDER_TASK, task_id=message.job_id, queue=ODD_QUEUE, args=[message.to_json()])
    )
    tags = {fast["properties"].pop("delivery_tag"), slow["properties"].pop("delivery_tag")}
    assert fast == slow
    assert len(tags) == 2 and all(str(uuid.UUID(t)) == t for t in tags)
    assert fast["properties"]["delivery_info"]["routing_key"] == ODD_QUEUE


def _body(args: Any) -> str:
    return base64.b64encode(json.dumps([args, {}, {}]).encode()).decode()


def _with(item: bytes, **changes: Any) -> bytes:
    envelope = json.loads(item)
    envelope.update(changes)
    return json.dumps(envelope).encode()


@pytest.mark.parametrize(
    ("item", "says"),
    [
        (b"not json at all", "not JSON"),
        (b"[1, 2]", "headers.task"),
        (_with(_envelope(_message()), body="%%%"), "base64"),
        (_with(_envelope(_message()), body=base64.b64encode(b"\xff").decode()), "not JSON"),
        (_with(_envelope(_message()), body=_body("no list")), "[args, kwargs, embed]"),
        (_with(_envelope(_message()), body=_body([1, 2])), "with 2 args"),
        (celery_envelope(task="ipab.other", task_id="x", queue="q", args=[{}]), "'ipab.other'"),
    ],
)
def test_an_item_that_is_not_a_render_call_is_invalid(item: bytes, says: str) -> None:
    with pytest.raises(MessageInvalid) as caught:
        decode_render_envelope(item)
    assert says in str(caught.value)


@pytest.mark.parametrize(
    ("change", "says"),
    [
        ({"v": 2}, "`v` is 2: this worker reads message version 1"),
        ({"job_id": "nope"}, "`job_id` is 'nope': must be a UUID"),
        ({"batch_id": None}, "`batch_id` is None: must be a UUID"),
    ],
)
def test_a_message_with_a_bad_version_or_id_is_invalid(change: dict[str, Any], says: str) -> None:
    raw = {**_message().to_json(), **change}
    with pytest.raises(MessageInvalid) as caught:
        decode_message(raw)
    assert str(caught.value) == says


def test_a_message_that_is_not_an_object_is_invalid() -> None:
    with pytest.raises(MessageInvalid, match="message is str: must be a JSON object"):
        decode_message("a string, not a job")


def test_a_job_with_a_bad_spec_is_invalid_input_naming_the_field() -> None:
    raw = _message().to_json()
    raw["spec"]["params"]["steps"] = 0
    with pytest.raises(InvalidInput) as caught:
        decode_render_envelope(celery_envelope(task=RENDER_TASK, task_id=raw["job_id"], queue="q", args=[raw]))
    assert caught.value.field == "steps" and caught.value.value == 0


def test_a_message_sent_by_celery_itself_decodes_to_the_same_job(celery_app: Celery, redis_url: str) -> None:
    message = _message()
    celery_app.send_task(RENDER_TASK, args=[message.to_json()], task_id=message.job_id, queue="render.t")
    client = redis.Redis.from_url(redis_url)
    [item] = client.lrange("render.t", 0, -1)
    assert decode_render_envelope(item) == message
    theirs, ours = json.loads(item), json.loads(_envelope(message, "render.t"))
    assert set(ours) == set(theirs)
    assert set(ours["headers"]) == set(theirs["headers"])
    assert set(ours["properties"]) == set(theirs["properties"])
    client.close()


def test_an_envelope_ipab_pushes_is_read_by_celerys_own_connection(celery_app: Celery, redis_url: str) -> None:
    message = _message()
    client = redis.Redis.from_url(redis_url)
    client.lpush("render.t", _envelope(message, "render.t"))
    with celery_app.connection_for_read() as connection:
        queue = connection.SimpleQueue("render.t", no_ack=True)
        received = queue.get(timeout=5)
        queue.close()
    args, kwargs, _embed = received.decode()
    assert received.headers["task"] == RENDER_TASK and received.headers["id"] == message.job_id
    assert received.content_type == "application/json" and kwargs == {}
    assert decode_message(args[0]) == message
    assert decode_envelope(_envelope(message)).args == args
    client.close()
