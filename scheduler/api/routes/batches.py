"""`/v1/batches`: submit a JSONL batch, list, read, results, gallery, cancel, retry."""

from __future__ import annotations

import json
from collections.abc import Iterator
from functools import partial
from typing import Annotated, Any, Final

from fastapi import APIRouter, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from scheduler.api.batch_create import BatchRequest
from scheduler.api.batch_create import create_batch as create_batch_rows
from scheduler.api.bodies import JSONL_TYPES, MULTIPART, media_type, read_body, read_multipart_file, unsupported
from scheduler.api.context import ApiContext, CallerDep, Context
from scheduler.api.idempotency import idempotent, idempotent_action
from scheduler.api.models import BatchCreated, BatchOut, JobDeleted
from scheduler.api.problems import from_invalid_input, invalid
from scheduler.api.routes.jobs import webhook_of
from scheduler.api.views import batch_forecast, batch_view
from scheduler.batches import actions
from scheduler.batches.actions import set_paused, wake
from scheduler.batches.counts import STATUSES, Tally
from scheduler.batches.deletion import mark_batch_jobs, request_batch_deletion
from scheduler.batches.events import BATCH_COMPLETED
from scheduler.batches.limits import queued_jobs_cap
from scheduler.batches.lookup import find_batch, on_batch
from scheduler.batches.record import Audience, batch_records, results_line
from scheduler.gallery.build import GALLERY_PER_PAGE, MAX_GALLERY_PER_PAGE, render_gallery
from scheduler.submission.manifest import EXPIRES_FIELD
from scheduler.usage.quotas import retry_within_quotas
from scheduler.webhooks.addresses import MAX_URL_CHARS
from shared.db import Batch
from shared.dispatch.policy import DEFAULT_LANE, Lane
from shared.errors import InvalidInput, NotFound
from shared.janitor.loop import wake_janitor
from shared.jobs import transaction
from shared.retention import parse_duration

router = APIRouter(prefix="/v1/batches", tags=["batches"])
MAX_GALLERY_PAGE: Final = 1_000_000  # a batch has at most IPAB_API_MAX_BATCH_ROWS jobs
RESULTS_PAGE: Final = 1000  # jobs per page of GET /v1/batches/{id}/results (a transaction and a chunk each)
MAX_DURATION_CHARS: Final = 40
MAX_LIST: Final = 1000
# The gallery page is inline CSS, inline script and data: images: nothing else may load or run.
GALLERY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
}
JSONL_BODY: Final = {
    "requestBody": {
        "required": True,
        "content": {
            "application/jsonl": {"schema": {"type": "string", "description": "one JSON job object per line"}},
            "multipart/form-data": {
                "schema": {"type": "object", "properties": {"file": {"type": "string", "format": "binary"}}}
            },
        },
    }
}


async def _rows_body(request: Request, ctx: ApiContext) -> bytes | bytearray:
    limit = ctx.settings.api_max_body_bytes
    kind = media_type(request)
    if kind in JSONL_TYPES:
        return await read_body(request, limit_bytes=limit)
    if kind == MULTIPART:
        data, _ = await read_multipart_file(request, field="file", limit_bytes=limit)
        return data
    raise unsupported(request, "application/jsonl, or multipart/form-data with a `file`")


@router.post("", status_code=202, response_model=BatchCreated, openapi_extra=JSONL_BODY)
async def create_batch(
    request: Request,
    ctx: Context,
    caller: CallerDep,
    skip_invalid: bool = False,
    webhook_url: Annotated[str | None, Query(max_length=MAX_URL_CHARS)] = None,
    lane: Annotated[Lane, Query()] = DEFAULT_LANE,
    expires_after: Annotated[str | None, Query(max_length=MAX_DURATION_CHARS)] = None,
) -> Any:
    """Submit a JSONL batch (rows as POST /v1/jobs takes them), in `lane` (default bulk) unless a row names one.

    `expires_after` (1h, 7d, 30d ... 3650d, or never): how long the images of rows that name none are
    kept once their job finishes; default: the tenant's retention, else the fleet's.

    Every bad row is reported as `line N: field: reason`, and nothing is submitted unless `skip_invalid`.
    At most IPAB_API_MAX_BATCH_ROWS rows (413 past them). At most 100 problems are listed; reading
    stops at the line that brings them to 100, and then nothing is submitted, even with `skip_invalid`.
    """
    # The query's checks come before the tenant's large-body slot: a webhook host's look-up may
    # wait out IPAB_WEBHOOK_DNS_TIMEOUT_S, and it reads no body (the look-ups have their own limit).
    webhook = (
        None
        if webhook_url is None
        else await webhook_of(
            ctx, caller.tenant, {"url": webhook_url, "events": [BATCH_COMPLETED]}, allowed=(BATCH_COMPLETED,)
        )
    )
    expires_after_s = None if expires_after is None else _retention(expires_after)
    async with ctx.heavy.slot(request, tenant=caller.tenant, route="POST /v1/batches"):
        data = await _rows_body(request, ctx)

        batch = BatchRequest(caller.tenant, data, skip_invalid, webhook, lane, expires_after_s)

        async def handle() -> JSONResponse:
            if ctx.batch_processes.takes(len(data)):  # its CPU and GIL are then another process's
                created = await ctx.batch_processes.create(batch)
            else:
                created = await run_in_threadpool(create_batch_rows, ctx, batch)
            return JSONResponse(created, status_code=202)

        return await idempotent(request, ctx, tenant=caller.tenant, content=data, handle=handle)


def _retention(value: str) -> int:
    """`expires_after` in seconds (FOREVER for never); 422 naming it otherwise."""
    try:
        return parse_duration(value, field=EXPIRES_FIELD)
    except InvalidInput as e:
        raise from_invalid_input(e) from None


def _newest(tenant: str, limit: int) -> Any:
    return select(Batch).where(Batch.tenant == tenant).order_by(Batch.created_at.desc(), Batch.id).limit(limit)


def _newest_ids(ctx: ApiContext, tenant: str, limit: int) -> list[str]:
    with transaction(ctx.sessions) as session:
        return list(session.scalars(_newest(tenant, limit).with_only_columns(Batch.id)))


def _list(ctx: ApiContext, tenant: str, limit: int, tallies: dict[str, Tally]) -> list[dict[str, Any]]:
    with transaction(ctx.sessions) as session:
        batches = session.scalars(_newest(tenant, limit).where(Batch.id.in_(list(tallies)))).all()
        return [batch_view(batch=b, tally=tallies[b.id], eta=False) for b in batches]  # less any deleted meanwhile


@router.get("", response_model=list[BatchOut])
async def list_batches(ctx: Context, caller: CallerDep, limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 100) -> Any:
    """The tenant's batches, newest first, with their counts."""
    batch_ids = await run_in_threadpool(_newest_ids, ctx, caller.tenant, limit)
    # Counted between the two transactions: a count may wait for the tenant's slot (scheduler/api/tallies.py).
    tallies = await ctx.tallies.read(caller.tenant, batch_ids)
    return await run_in_threadpool(_list, ctx, caller.tenant, limit, tallies)


def _batch(ctx: ApiContext, tenant: str, batch_id: str) -> Batch:
    return on_batch(ctx.sessions, ref=batch_id, tenant=tenant, act=lambda _, batch: batch)


def _cached_view(ctx: ApiContext, tenant: str, batch_id: str) -> tuple[str, dict[str, Any] | None]:
    """The batch's id, and its view when its counts are cached (else None: they are to be counted)."""
    with transaction(ctx.sessions) as session:
        batch = find_batch(session=session, ref=batch_id, tenant=tenant)
        tally = ctx.tallies.cached([batch.id]).get(batch.id)
        return batch.id, None if tally is None else _view(ctx, batch, tally)


def _view_of(ctx: ApiContext, tenant: str, batch_id: str, tally: Tally) -> dict[str, Any]:
    with transaction(ctx.sessions) as session:
        return _view(ctx, find_batch(session=session, ref=batch_id, tenant=tenant), tally)


def _read(ctx: ApiContext, tenant: str, batch_id: str, *, fresh: bool = False) -> dict[str, Any]:
    """The batch's view after an action (in the action's thread); `fresh`: counted anew (the action
    changed the counts), else from the tallies when they hold it."""
    if fresh:
        found = _batch(ctx, tenant, batch_id).id
    else:
        found, view = _cached_view(ctx, tenant, batch_id)
        if view is not None:
            return view
    return _view_of(ctx, tenant, found, ctx.tallies.recount(tenant, [found])[found])


def _view(ctx: ApiContext, batch: Batch, tally: Tally) -> dict[str, Any]:
    forecast = batch_forecast(ctx, batch=batch) if tally.counts["queued"] else None
    return batch_view(batch=batch, tally=tally, forecast=forecast)


@router.get("/{batch_id}", response_model=BatchOut)
async def get_batch(batch_id: str, ctx: Context, caller: CallerDep) -> Any:
    """Counts per status, progress and ETA."""
    found, view = await run_in_threadpool(_cached_view, ctx, caller.tenant, batch_id)
    if view is not None:
        return view
    # Counted between the two transactions: a count may wait for the tenant's slot (scheduler/api/tallies.py).
    tally = (await ctx.tallies.read(caller.tenant, [found]))[found]
    return await run_in_threadpool(_view_of, ctx, caller.tenant, found, tally)


def _result_lines(ctx: ApiContext, batch_id: str, status: str | None) -> Iterator[bytes]:
    """The lines RESULTS_PAGE jobs at a time, each page read in a transaction of its own and sent as
    one chunk: a client that reads slowly (or not at all) holds no SQL connection or transaction
    meanwhile (one per stream exhausted the API's pool), and a chunk is one thread hop, not a line."""
    after: tuple[int, str] | None = None
    while True:
        with transaction(ctx.sessions) as session:
            page = list(
                batch_records(session=session, batch_id=batch_id, status=status, limit=RESULTS_PAGE, after=after)
            )
        if page:
            lines = (results_line(record, store=ctx.store, audience=Audience.TENANT) for record in page)
            yield "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines).encode()
        if len(page) < RESULTS_PAGE:
            return
        after = (page[-1].line, page[-1].job_id)


@router.get("/{batch_id}/results", response_class=StreamingResponse)
async def get_results(batch_id: str, ctx: Context, caller: CallerDep, status: str | None = None) -> Any:
    """One JSON line per job, as `ipab results` prints them less the fleet's figures; `?status=` keeps one status."""
    if status is not None and status not in STATUSES:
        raise invalid("status", status, f"must be one of {', '.join(STATUSES)}")
    batch = await run_in_threadpool(_batch, ctx, caller.tenant, batch_id)  # 404 for another tenant's
    return StreamingResponse(_result_lines(ctx, batch.id, status), media_type="application/jsonl")


def gallery_in(ctx: ApiContext, batch_id: str, page: int, per_page: int) -> str:
    """A page of the batch's gallery, rendered on `ctx` (a card per job, thumbnails read from S3)."""
    with transaction(ctx.sessions) as session:
        batch = session.get(Batch, batch_id)
    if batch is None:  # deleted since it was found
        raise NotFound("batch", batch_id)
    return render_gallery(sessions=ctx.sessions, store=ctx.store, batch=batch, page=page, per_page=per_page)


def _gallery(ctx: ApiContext, tenant: str, batch_id: str, page: int, per_page: int) -> str:
    found = _batch(ctx, tenant, batch_id).id  # 404 for another tenant's, here
    # 47 ms of Python for 20 jobs, more for larger batches: in this process, every other request's
    # thread waited on the GIL at each of its SQL and Redis calls meanwhile (bench/two_tenants.py).
    return ctx.batch_processes.call(ctx, gallery_in, found, page, per_page)


@router.get("/{batch_id}/gallery", response_class=HTMLResponse)
async def get_gallery(
    batch_id: str,
    ctx: Context,
    caller: CallerDep,
    page: Annotated[int, Query(ge=1, le=MAX_GALLERY_PAGE)] = 1,
    per_page: Annotated[int, Query(ge=1, le=MAX_GALLERY_PER_PAGE)] = GALLERY_PER_PAGE,
) -> Any:
    """A page of the batch as a self-contained HTML page, a card per job, thumbnails embedded (as
    `ipab gallery`): its jobs `per_page` at a time in manifest order, so that a page of a
    100,000-job batch costs what a page of a small one does."""
    html_page = await run_in_threadpool(_gallery, ctx, caller.tenant, batch_id, page, per_page)
    return HTMLResponse(html_page, headers=GALLERY_HEADERS)


def cancel_in(ctx: ApiContext, batch_id: str) -> int:
    """Cancel the batch's live jobs on `ctx` (in chunks: see `cancel_batch`); how many."""
    return actions.cancel_batch(sessions=ctx.sessions, batch_id=batch_id)


def _cancel(ctx: ApiContext, tenant: str, batch_id: str) -> dict[str, Any]:
    found = _batch(ctx, tenant, batch_id).id  # 404 for another tenant's, here
    ctx.batch_processes.call(ctx, cancel_in, found)  # seconds of Python for a large batch: not in this process
    return _read(ctx, tenant, batch_id, fresh=True)


@router.post("/{batch_id}/cancel", response_model=BatchOut)
async def cancel_batch(batch_id: str, request: Request, ctx: Context, caller: CallerDep) -> Any:
    """Cancel every queued and running job of the batch."""
    return await idempotent_action(request, ctx, caller.tenant, partial(_cancel, ctx, caller.tenant, batch_id))


def _retry(ctx: ApiContext, tenant: str, batch_id: str) -> dict[str, Any]:
    batch = _batch(ctx, tenant, batch_id)
    cap = queued_jobs_cap(ctx.settings.api_max_queued_jobs)  # queued again, they count again
    ids = retry_within_quotas(sessions=ctx.sessions, batch_id=batch.id, cap=cap)
    if ids:
        wake(redis_client=ctx.redis, settings=ctx.settings, model_set=batch.model_set)
    return {**_read(ctx, tenant, batch.id, fresh=True), "retried": len(ids)}


def _pause(ctx: ApiContext, tenant: str, batch_id: str, *, paused: bool) -> dict[str, Any]:
    batch = _batch(ctx, tenant, batch_id)
    set_paused(sessions=ctx.sessions, batch_id=batch.id, paused=paused)
    if not paused:
        wake(redis_client=ctx.redis, settings=ctx.settings, model_set=batch.model_set)
    return _read(ctx, tenant, batch.id)  # pausing changes no job's status


@router.post("/{batch_id}/pause", response_model=BatchOut)
async def pause_batch(batch_id: str, request: Request, ctx: Context, caller: CallerDep) -> Any:
    """Queued jobs of the batch do not start until it is resumed; running ones finish."""
    action = partial(_pause, ctx, caller.tenant, batch_id, paused=True)
    return await idempotent_action(request, ctx, caller.tenant, action, content=b"pause")


@router.post("/{batch_id}/resume", response_model=BatchOut)
async def resume_batch(batch_id: str, request: Request, ctx: Context, caller: CallerDep) -> Any:
    """The batch's queued jobs start again, in their lane's turn."""
    action = partial(_pause, ctx, caller.tenant, batch_id, paused=False)
    return await idempotent_action(request, ctx, caller.tenant, action, content=b"resume")


@router.post("/{batch_id}/retry", response_model=BatchOut)
async def retry_batch(batch_id: str, request: Request, ctx: Context, caller: CallerDep) -> Any:
    """Re-queue the batch's failed jobs."""
    return await idempotent_action(request, ctx, caller.tenant, partial(_retry, ctx, caller.tenant, batch_id))


def delete_in(ctx: ApiContext, batch_id: str) -> int:
    """Cancel and mark the jobs of a batch being deleted on `ctx` (in chunks: see `mark_batch_jobs`); how many."""
    return mark_batch_jobs(sessions=ctx.sessions, batch_id=batch_id)


def _delete(ctx: ApiContext, tenant: str, batch_id: str) -> dict[str, Any]:
    def ask(session: Session, batch: Batch) -> str:
        request_batch_deletion(session=session, batch_id=batch.id)
        return batch.id

    found = on_batch(ctx.sessions, ref=batch_id, tenant=tenant, act=ask)  # deleting from here: the janitor finishes
    ctx.batch_processes.call(ctx, delete_in, found)  # seconds of Python for a large batch: not in this process
    wake_janitor(redis_client=ctx.redis, prefix=ctx.settings.redis_prefix)
    return {"id": found, "status": "deleting"}


@router.delete("/{batch_id}", status_code=202, response_model=JobDeleted)
async def delete_batch(batch_id: str, ctx: Context, caller: CallerDep) -> Any:
    """Delete the batch: its queued jobs are canceled, every job's image and record go, then the batch.

    202 while under way (a running job goes once it finishes); asking again is harmless; once done, 404.
    """
    return JSONResponse(await run_in_threadpool(_delete, ctx, caller.tenant, batch_id), status_code=202)
