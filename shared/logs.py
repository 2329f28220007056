"""Log lines: plain text (the default) or one JSON object per line (`IPAB_LOG_FORMAT=json`).

Every line logged while a job is in hand carries that job's `job_id`, `batch_id`, `tenant`
and `attempt`: the worker binds them to a context variable when it claims the job (the
runner's step 2), and a filter on the handler copies them onto each record, whichever
library logged it. Threads that work for a job (the lease's heartbeat, the publisher) run
in a copy of the context that was bound when they took the job.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, datetime
from typing import Any, Final

from shared.redact import MaskingFormatter, mask_text

JOB_FIELDS: Final = ("job_id", "batch_id", "tenant", "attempt")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"
NOISY_LOGGERS: Final = ("botocore", "boto3", "urllib3")

_job: ContextVar[Mapping[str, Any] | None] = ContextVar("ipab_job", default=None)


def bind_job(**fields: Any) -> None:
    """Mark every following line of this context as about one job (fields: JOB_FIELDS)."""
    _job.set({k: v for k, v in fields.items() if k in JOB_FIELDS and v is not None})


def unbind_job() -> None:
    """Lines from here on are about no job."""
    _job.set(None)


def bound_job() -> Mapping[str, Any]:
    """The job fields bound in this context ({} when none)."""
    return dict(_job.get() or {})


@contextmanager
def job_context(fields: Mapping[str, Any]) -> Iterator[None]:
    """Bind `fields` for the duration of the block (on another thread, say), then restore."""
    token = _job.set(dict(fields) or None)
    try:
        yield
    finally:
        _job.reset(token)


class JobFieldsFilter(logging.Filter):
    """Copies the bound job fields onto every record that passes the handler."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Always True: it only adds attributes."""
        fields = _job.get() or _celery_task_fields(record)
        for name, value in fields.items():
            if not hasattr(record, name):
                setattr(record, name, value)
        return True


def _celery_task_fields(record: logging.LogRecord) -> Mapping[str, Any]:
    """Celery's own lines about a task it has not handed to the runner yet ("received") name
    the task id, which is the job id (shared/wire.py); the other fields are not known there."""
    args = record.args
    if record.name.startswith("celery.") and isinstance(args, Mapping) and isinstance(args.get("id"), str):
        return {"job_id": args["id"]}
    return {}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message, job fields, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        """The record as a single line of JSON, credentials masked."""
        line: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": mask_text(record.getMessage()),
        }
        line.update({name: getattr(record, name) for name in JOB_FIELDS if hasattr(record, name)})
        if record.exc_info:
            line["exc_info"] = mask_text(self.formatException(record.exc_info))
        return json.dumps(line, default=str)


def configure_logging(*, verbose: bool, log_format: str) -> None:
    """The root handler on stderr, as text or JSON lines, with job fields on every job line."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json" else MaskingFormatter(TEXT_FORMAT))
    handler.addFilter(JobFieldsFilter())
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    logging.captureWarnings(log_format == "json")  # a warning is a log line too, not raw stderr
    for noisy in NOISY_LOGGERS:
        logging.getLogger(noisy).setLevel(logging.WARNING)
