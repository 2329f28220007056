"""The wire codec: the job message and its Celery envelope, built and parsed here alone.

A job message is small JSON: `{"v": 1, "job_id", "batch_id", "spec"}` (never image bytes,
never a pickle). It travels as the one argument of the `ipab.render` Celery task, inside
a Celery protocol-2 envelope as kombu's Redis transport writes it (JSON with a base64
body, pushed with LPUSH on the queue's list). The consumer is a plain Celery worker, so
that format is pinned by a test against Celery's own `send_task`, not by trust.

Building: `message_text` makes the message from spec JSON text already made (submit
stores that same text in SQL), and `render_envelopes` wraps many messages with one
%-template per queue: a 100k-row submit formats one string per message instead of
encoding a nested dict. `celery_envelope` (any task, any arguments) fills the same
template, so the envelope's fields are written down once, in `_envelope`.

Parsing: `decode_message` is the only way in for a message; `decode_envelope` reads a
raw queue item. Anything that is not a job raises `MessageInvalid`; a job with a bad
spec raises `InvalidInput` (the worker fails that job permanently).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import socket
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from shared.errors import MessageInvalid
from shared.spec import JobSpec, parse_spec

MESSAGE_VERSION: Final = 1
RENDER_TASK: Final = "ipab.render"
_EMBED_CALLBACKS: Final = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
_ORIGIN: Final = f"ipab-scheduler@{socket.gethostname()}"
# Built once: `json.dumps(separators=...)` builds a new encoder on every call.
_COMPACT: Final = json.JSONEncoder(separators=(",", ":"))
_CALLBACKS_JSON: Final = _COMPACT.encode(_EMBED_CALLBACKS)
# json's own C string encoder: quotes and escapes one string, without json.dumps' overhead.
_json_string: Callable[[str], str] = json.encoder.encode_basestring_ascii


# The job message.


@dataclass(frozen=True)
class JobMessage:
    """One job as it travels through Redis."""

    job_id: str
    batch_id: str
    spec: JobSpec

    def to_text(self) -> str:
        """The message as compact JSON text, as it goes on the wire."""
        return message_text(job_id=self.job_id, batch_id=self.batch_id, spec_json=self.spec.to_text())

    def to_json(self) -> dict[str, Any]:
        """The message as a JSON-able dict, as the Celery task receives it."""
        return dict(json.loads(self.to_text()))


def message_text(*, job_id: str, batch_id: str, spec_json: str) -> str:
    """A job message as compact JSON text, from the spec's JSON text (`JobSpec.to_text`)."""
    return (
        f'{{"v":{MESSAGE_VERSION},"job_id":{_json_string(job_id)},'
        f'"batch_id":{_json_string(batch_id)},"spec":{spec_json}}}'
    )


def _check_id(raw: Mapping[str, Any], name: str) -> str:
    value = raw.get(name)
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise MessageInvalid(f"`{name}` is {value!r}: must be a UUID") from None


def decode_ids(raw: Any) -> tuple[str, str]:
    """The (job_id, batch_id) of a decoded message, or `MessageInvalid` if it is not a job message."""
    if not isinstance(raw, Mapping):
        raise MessageInvalid(f"message is {type(raw).__name__}: must be a JSON object")
    if raw.get("v") != MESSAGE_VERSION:
        raise MessageInvalid(f"`v` is {raw.get('v')!r}: this worker reads message version {MESSAGE_VERSION}")
    return _check_id(raw, "job_id"), _check_id(raw, "batch_id")


def decode_message(raw: Any) -> JobMessage:
    """Decode a message (the parsed JSON). Raises `MessageInvalid`, or `InvalidInput` for a bad spec."""
    job_id, batch_id = decode_ids(raw)
    return JobMessage(job_id=job_id, batch_id=batch_id, spec=parse_spec(raw.get("spec")))


# The Celery envelope.


def _envelope(*, task: str, task_id: str, queue: str, body_b64: str, delivery_tag: str) -> dict[str, Any]:
    # The fields Celery 5's `send_task` writes through kombu's Redis transport (tested).
    headers: dict[str, Any] = {
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
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
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


@functools.lru_cache(maxsize=64)
def _envelope_template(task: str, queue: str) -> str:
    # `_envelope` as JSON text with %-placeholders where each message differs. The body
    # (base64) and the delivery tag (a uuid) need no JSON escaping; the task id does.
    mark = uuid.uuid4().hex  # cannot occur in a task or queue name by accident
    fields = {"task_id": f"{mark}i", "body_b64": f"{mark}b", "delivery_tag": f"{mark}t"}
    text = _COMPACT.encode(_envelope(task=task, queue=queue, **fields)).replace("%", "%%")
    text = text.replace(f'"{fields.pop("task_id")}"', "%(task_id)s")
    for name, placeholder in fields.items():
        text = text.replace(placeholder, f"%({name})s")
    return text


def _fill(template: str, *, task_id: str, args_json: str) -> bytes:
    body = f"[{args_json},{{}},{_CALLBACKS_JSON}]".encode()
    values = {
        "task_id": _json_string(task_id),
        "body_b64": base64.b64encode(body).decode(),
        "delivery_tag": str(uuid.uuid4()),
    }
    return (template % values).encode()


def celery_envelope(*, task: str, task_id: str, queue: str, args: Sequence[Any]) -> bytes:
    """A Celery protocol-2 message calling `task` with positional `args`, ready for LPUSH on `queue`."""
    return _fill(_envelope_template(task, queue), task_id=task_id, args_json=_COMPACT.encode(list(args)))


def render_envelopes(*, queue: str, messages: Sequence[tuple[str, str]]) -> list[bytes]:
    """`ipab.render` Celery messages for (job id, `message_text`) pairs; the job id is the task id."""
    template = _envelope_template(RENDER_TASK, queue)
    return [_fill(template, task_id=job_id, args_json=f"[{text}]") for job_id, text in messages]


@dataclass(frozen=True)
class TaskCall:
    """What a raw queue item asks for: a task, its id, and its positional arguments."""

    task: str
    task_id: str
    args: list[Any]


def _json_object(text: str | bytes, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError both
        raise MessageInvalid(f"{what} is not JSON ({e}): {text[:80]!r}") from None


def _body(item: Mapping[str, Any]) -> Any:
    properties = item.get("properties")
    encoding = properties.get("body_encoding") if isinstance(properties, Mapping) else None
    if encoding != "base64" or item.get("content-type") != "application/json":
        shown = (encoding, item.get("content-type"))
        raise MessageInvalid(f"`body_encoding`, `content-type` are {shown!r}: must be base64 and application/json")
    try:
        return _json_object(base64.b64decode(str(item.get("body")), validate=True), "the envelope's body")
    except binascii.Error:
        raise MessageInvalid(f"`body` is {str(item.get('body'))[:80]!r}: must be base64") from None


def decode_envelope(item: str | bytes) -> TaskCall:
    """Read a raw queue item as kombu's Redis transport stores it. Raises `MessageInvalid`."""
    envelope = _json_object(item, "the queue item")
    headers = envelope.get("headers") if isinstance(envelope, Mapping) else None
    if not isinstance(headers, Mapping) or not isinstance(headers.get("task"), str):
        raise MessageInvalid("`headers.task` is missing: the queue item is not a Celery protocol-2 message")
    body = _body(envelope)
    if not (isinstance(body, list) and len(body) == 3 and isinstance(body[0], list)):
        raise MessageInvalid(f"`body` is {body!r:.80}: must be [args, kwargs, embed] (Celery protocol 2)")
    return TaskCall(task=headers["task"], task_id=str(headers.get("id")), args=body[0])


def decode_render_envelope(item: str | bytes) -> JobMessage:
    """The job in a raw `ipab.render` queue item. Raises `MessageInvalid`, or `InvalidInput` for a bad spec."""
    call = decode_envelope(item)
    if call.task != RENDER_TASK or len(call.args) != 1:
        raise MessageInvalid(f"task is {call.task!r} with {len(call.args)} args: must be {RENDER_TASK} with 1")
    return decode_message(call.args[0])
