"""A POST /v1/batches body into a batch: count its lines, parse and validate its rows, submit them.

The same code runs in the API process (small bodies) and in a batch process
(`scheduler/api/batch_processes.py`, large ones): what it is given, `BatchRequest`, and what
it answers, the 202's body or an `ApiProblem`, are plain data, so either can cross a process
boundary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy.orm import Session

from scheduler.api.collector import collector_paused
from scheduler.api.context import ApiContext
from scheduler.api.problems import ApiProblem, field_error, from_invalid_input
from scheduler.api.submission import api_field, parse_api_rows, problems_of, refuse_when_full, submit_api_rows
from scheduler.submission.manifest import ParsedManifest, read_jsonl_bytes
from scheduler.submission.submit import RowOptions, SubmitResult
from scheduler.webhooks.subscriptions import subscribe
from shared.db import new_id
from shared.dispatch.policy import DEFAULT_LANE
from shared.errors import MAX_LISTED_PROBLEMS, InvalidInput, ManifestInvalid, TooManyRows

COUNT_SLICE_BYTES: Final = 1024 * 1024  # about 1 ms of counting newlines (see `_line_count`)


@dataclass(frozen=True)
class BatchRequest:
    """What a POST /v1/batches asks for, its body read and its query checked (`webhook`: url, events).

    `data` is the body, or empty with `body_path`, the file that holds it.
    """

    tenant: str
    data: bytes | bytearray
    skip_invalid: bool = False
    webhook: tuple[str, list[str]] | None = None
    lane: str = DEFAULT_LANE
    expires_after_s: int | None = None
    body_path: str | None = None


def too_many_rows(limit: int) -> ApiProblem:
    """413 naming the row limit and its setting."""
    reason = f"holds more than {limit} rows (IPAB_API_MAX_BATCH_ROWS); split it into batches of at most {limit}"
    return ApiProblem(413, f"the batch {reason}", errors=[field_error("body", None, reason)], kind="too-many-rows")


def _parse(ctx: ApiContext, data: bytes | bytearray) -> ParsedManifest:
    """The body's rows, read one line at a time up to the row cap (413 past it) and the problem cap."""
    try:
        return parse_api_rows(
            read_jsonl_bytes(data), max_rows=ctx.settings.api_max_batch_rows, max_problems=MAX_LISTED_PROBLEMS
        )
    except TooManyRows as e:
        raise too_many_rows(e.limit) from None


def _line_count(data: bytes | bytearray) -> int:
    """How many lines `data` holds, blank ones included (C speed: the body is not split).

    Counted a slice at a time: one count of a 32 MiB body held the GIL for 42 ms, and every
    other request of the process waited for it; between slices other threads get their turn.
    """
    slices = range(0, len(data), COUNT_SLICE_BYTES)
    newlines = sum(data.count(b"\n", start, start + COUNT_SLICE_BYTES) for start in slices)
    return newlines + (0 if data.endswith(b"\n") else 1)


@collector_paused()  # its rows are a million objects: no full collection walks them (see the module)
def create_batch(ctx: ApiContext, request: BatchRequest) -> dict[str, Any]:
    """Submit the request's rows as a new batch of its tenant; the 202's body.

    ApiProblem (413, 422, 503), CapReached or QuotaExceeded (429) when nothing was submitted.
    """
    lines = _line_count(request.data)
    refuse_when_full(ctx, request.tenant, adding=lines)  # before its body is parsed
    parsed = _parse(ctx, request.data)
    try:
        options = RowOptions(
            tenant=request.tenant,
            skip_invalid=request.skip_invalid,
            after_insert=lambda session, batch_id, _job_ids: _subscribe(session, batch_id, request),
            expires_after_s=request.expires_after_s,
            lane=request.lane,
        )
        result = submit_api_rows(ctx, parsed=parsed, batch_name=f"{request.tenant}/{new_id()}", options=options)
    except ManifestInvalid as e:
        lines_after = lines - (e.stopped_after or 0)
        raise problems_of(e.problems, with_lines=True, stopped_after=e.stopped_after, lines_after=lines_after) from None
    except InvalidInput as e:
        raise from_invalid_input(e) from None
    return _created(result)


def _subscribe(session: Session, batch_id: str, request: BatchRequest) -> None:
    """The batch's `batch.completed` webhook, in the transaction that inserts the batch."""
    if request.webhook is not None:
        url, events = request.webhook
        subscribe(session=session, subject_id=batch_id, kind="batch", tenant=request.tenant, url=url, events=events)


def _created(result: SubmitResult) -> dict[str, Any]:
    """The 202's body: the first MAX_LISTED_PROBLEMS problems of the rows skipped, and how many in all."""
    listed = result.invalid[:MAX_LISTED_PROBLEMS]
    invalid = [{"line": p.line, "field": api_field(p.field), "reason": p.reason} for p in listed]
    count = len(result.invalid)
    return {
        "id": result.batch_id,
        "status": "in_progress",
        "added": result.added,
        "invalid": invalid,
        "invalid_count": count,
    }
