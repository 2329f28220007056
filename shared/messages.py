"""The wire contract: one job message, small JSON, with a single decode boundary.

A message carries the job id, its batch and its full spec (never image bytes, never a
pickle). `decode_message` is the only way in; anything it cannot turn into a valid
`JobMessage` raises `MessageInvalid` (not a job at all) or `InvalidInput` (a job with a bad
spec, which the worker fails permanently).
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final

from shared.errors import MessageInvalid
from shared.spec import JobSpec, parse_spec

MESSAGE_VERSION: Final = 1


@dataclass(frozen=True)
class JobMessage:
    """One job as it travels through Redis."""

    job_id: str
    batch_id: str
    spec: JobSpec

    def to_json(self) -> dict[str, Any]:
        """The message body as a JSON-able dict."""
        return {"v": MESSAGE_VERSION, "job_id": self.job_id, "batch_id": self.batch_id, "spec": self.spec.to_json()}


def _check_id(raw: Mapping[str, Any], name: str) -> str:
    value = raw.get(name)
    try:
        return str(uuid.UUID(str(value)))
    except ValueError:
        raise MessageInvalid(f"`{name}` is {value!r}: must be a UUID") from None


def decode_ids(raw: Any) -> tuple[str, str]:
    """The (job_id, batch_id) of a message, or `MessageInvalid` if it is not a job message."""
    if not isinstance(raw, Mapping):
        raise MessageInvalid(f"message is {type(raw).__name__}: must be a JSON object")
    if raw.get("v") != MESSAGE_VERSION:
        raise MessageInvalid(f"`v` is {raw.get('v')!r}: this worker reads message version {MESSAGE_VERSION}")
    return _check_id(raw, "job_id"), _check_id(raw, "batch_id")


def decode_message(raw: Any) -> JobMessage:
    """Decode a message body. Raises `MessageInvalid` or `InvalidInput` (bad spec)."""
    job_id, batch_id = decode_ids(raw)
    return JobMessage(job_id=job_id, batch_id=batch_id, spec=parse_spec(raw.get("spec")))
