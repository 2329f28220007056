"""A queue item that is not even JSON must not stop the worker.

kombu's Redis transport decodes each item it pops with a bare `json.loads`; one garbage
item (a hand-made LPUSH, a foreign producer) raises inside the consumer loop and Celery
stops the whole worker with "Unrecoverable error". We wrap that decoder: an undecodable
item is logged and replaced by a message for a task name that no worker has, which Celery
reports and discards like any unknown task. Valid items decode exactly as before.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from typing import Any, Final

from shared.wire import celery_envelope

log = logging.getLogger(__name__)
NOT_JSON_TASK: Final = "ipab.discard-undecodable-item"


def _tolerant(loads: Callable[..., Any]) -> Callable[..., Any]:
    def decode(text: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return loads(text, *args, **kwargs)
        except ValueError:
            log.error("dropping a queue item that is not JSON: %r", str(text)[:80])
            stand_in = celery_envelope(task=NOT_JSON_TASK, task_id=str(uuid.uuid4()), queue="", args=[])
            return json.loads(stand_in)

    return decode


def install_poison_guard() -> None:
    """Make kombu's Redis transport survive undecodable queue items (once per process)."""
    import kombu.transport.redis as transport

    loads = getattr(transport, "loads")  # noqa: B009 (the stubs do not declare it)
    if not getattr(loads, "_ipab_guard", False):
        guarded = _tolerant(loads)
        guarded._ipab_guard = True  # type: ignore[attr-defined]
        setattr(transport, "loads", guarded)  # noqa: B010
