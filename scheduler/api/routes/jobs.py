"""`/v1/jobs`: create one job, read it, fetch its image, cancel it."""

from __future__ import annotations

from functools import partial
from typing import Any, Final, NoReturn

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, RedirectResponse
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from scheduler.api.bodies import read_json_object
from scheduler.api.context import ApiContext, CallerDep, Context
from scheduler.api.idempotency import canonical_json, idempotent, idempotent_action
from scheduler.api.job_groups import JobGroups, JobRequest
from scheduler.api.models import JobCreated, JobDeleted, JobIn, JobOut, openapi_body
from scheduler.api.problems import ApiProblem, field_error, from_invalid_input
from scheduler.api.submission import WEBHOOK_FIELD, api_batch_name, parse_api_rows, problems_of, submit_api_rows
from scheduler.api.views import job_view
from scheduler.batches.actions import cancel
from scheduler.batches.deletion import request_job_deletion
from scheduler.batches.events import JOB_EVENTS
from scheduler.batches.lookup import on_job
from scheduler.submission.manifest import ParsedManifest
from scheduler.submission.submit import RowOptions
from scheduler.webhooks.subscriptions import check_events
from shared.db import Batch, Job
from shared.dispatch.policy import INTERACTIVE_LANE
from shared.errors import InvalidInput, ManifestInvalid
from shared.janitor.loop import wake_janitor

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
MAX_JOB_BODY_BYTES: Final = 256 * 1024
JOB_EVENT_NAMES: Final = tuple(JOB_EVENTS.values())


async def webhook_of(
    ctx: ApiContext, tenant: str, raw: Any, *, allowed: tuple[str, ...]
) -> tuple[str, list[str]] | None:
    """(url, events) of a `webhook` object, checked; None when absent.

    Its host is looked up in the webhook resolver's own threads, at most
    IPAB_WEBHOOK_DNS_TIMEOUT_S: a name whose DNS never answers is a 422, and it blocks
    neither the event loop nor the threads that serve other requests.
    """
    if raw is None:
        return None
    if not isinstance(raw, dict) or set(raw) - {"url", "events"}:
        raise from_invalid_input(InvalidInput(WEBHOOK_FIELD, raw, "must be an object {url, events}"))
    s = ctx.settings
    try:
        url = await ctx.webhook_resolver.check_webhook_url(
            raw.get("url"), tenant=tenant, timeout_s=s.webhook_dns_timeout_s, allow_private=s.webhook_allow_private
        )
        return url, check_events(raw.get("events"), allowed=allowed)
    except InvalidInput as e:
        raise from_invalid_input(e) from None


def _refuse(ctx: ApiContext, tenant: str, parsed: ParsedManifest) -> NoReturn:
    """422 with every problem of an invalid row, those of its references included: it goes down
    the submit path, which writes nothing for it and raises them all."""
    try:
        options = RowOptions(tenant=tenant, lane=INTERACTIVE_LANE)
        submit_api_rows(ctx, parsed=parsed, batch_name=api_batch_name(tenant), options=options)
    except ManifestInvalid as e:
        raise problems_of(e.problems, with_lines=False) from None
    except InvalidInput as e:
        raise from_invalid_input(e) from None
    raise problems_of(parsed.problems, with_lines=False)


@router.post("", status_code=202, response_model=JobCreated, openapi_extra=openapi_body(JobIn))
async def create_job(request: Request, ctx: Context, caller: CallerDep) -> Any:
    """Queue one job (fields as a manifest row; `references` are ids); 202 with its id."""
    body = await read_json_object(request, limit_bytes=MAX_JOB_BODY_BYTES)
    content = canonical_json(body)

    async def handle() -> JSONResponse:
        # A row is checked here (pure CPU); a webhook URL is looked up by `webhook_of` (awaited);
        # looking up an invalid row's references reads SQL: in a thread.
        fields = dict(body)
        webhook = await webhook_of(ctx, caller.tenant, fields.pop(WEBHOOK_FIELD, None), allowed=JOB_EVENT_NAMES)
        parsed = parse_api_rows([(1, fields)])
        if not parsed.rows:
            await run_in_threadpool(_refuse, ctx, caller.tenant, parsed)
        job = JobRequest(caller.tenant, parsed.rows[0], webhook)
        job_id = await job_groups(request).submit(job)
        return JSONResponse({"id": job_id, "status": "queued", "client_id": job.row.client_id}, status_code=202)

    return await idempotent(request, ctx, tenant=caller.tenant, content=content, handle=handle)


def job_groups(request: Request) -> JobGroups:
    """The app's job writer (`create_app` makes one)."""
    groups: JobGroups = request.app.state.job_groups
    return groups


def _view(ctx: ApiContext, _: Session, job: Job, batch: Batch) -> dict[str, Any]:
    return job_view(ctx, job=job, batch=batch)


def _read(ctx: ApiContext, tenant: str, job_id: str) -> dict[str, Any]:
    return on_job(ctx.sessions, job_id=job_id, tenant=tenant, act=partial(_view, ctx))


@router.get("/{job_id}", response_model=JobOut)
async def get_job(job_id: str, ctx: Context, caller: CallerDep) -> Any:
    """The job: status, queue position, attempts, timings, error, and `image_url` once succeeded."""
    return await run_in_threadpool(_read, ctx, caller.tenant, job_id)


@router.get("/{job_id}/image", status_code=307, response_class=RedirectResponse)
async def get_job_image(job_id: str, ctx: Context, caller: CallerDep) -> Any:
    """Redirect (307) to the job's image at its presigned URL; 409 while it has none; 410 once it was removed."""
    view = await run_in_threadpool(_read, ctx, caller.tenant, job_id)
    if view["data_removed_at"] is not None:
        detail = f"the image of job {job_id} was removed at {view['data_removed_at']} (it expired, or was deleted)"
        raise ApiProblem(410, detail, errors=[field_error("id", job_id, detail)], kind="data-removed")
    if view["image_url"] is None:
        detail = f"job {job_id} is {view['status']}: only a succeeded job has an image"
        raise ApiProblem(409, detail, errors=[field_error("id", job_id, detail)], kind="no-image")
    return RedirectResponse(view["image_url"], status_code=307)


def _cancel(ctx: ApiContext, tenant: str, job_id: str) -> dict[str, Any]:
    def cancel_one(session: Session, job: Job, batch: Batch) -> None:
        cancel(session=session, batch_id=batch.id, job_ids=[job.id])

    on_job(ctx.sessions, job_id=job_id, tenant=tenant, act=cancel_one)
    return _read(ctx, tenant, job_id)


@router.post("/{job_id}/cancel", response_model=JobOut)
async def cancel_job(job_id: str, request: Request, ctx: Context, caller: CallerDep) -> Any:
    """Cancel a queued or running job (a running one stops within IPAB_HEARTBEAT_S); final jobs stay as they are."""
    return await idempotent_action(request, ctx, caller.tenant, partial(_cancel, ctx, caller.tenant, job_id))


def _delete(ctx: ApiContext, tenant: str, job_id: str) -> dict[str, Any]:
    on_job(ctx.sessions, job_id=job_id, tenant=tenant, act=lambda s, *_: request_job_deletion(session=s, job_id=job_id))
    wake_janitor(redis_client=ctx.redis, prefix=ctx.settings.redis_prefix)
    return {"id": job_id, "status": "deleting"}


@router.delete("/{job_id}", status_code=202, response_model=JobDeleted)
async def delete_job(job_id: str, ctx: Context, caller: CallerDep) -> Any:
    """Delete the job: canceled if queued, its image and its record removed (a running job, once it finishes).

    202 while under way; asking again is harmless; once done, 404.
    """
    return JSONResponse(await run_in_threadpool(_delete, ctx, caller.tenant, job_id), status_code=202)
