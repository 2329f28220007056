"""`/v1/plans`: nightly plans (`ipab plans ...`) for admin keys: apply, list, show, history, run, pause, delete.

A plan acts for whichever tenant it names, so every route needs an admin key (403
otherwise). A plan comes as its file's TOML text; nothing in it may point at the server's
disk: its manifest is an `s3://` URI in an allowed reference bucket, its model set a name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Final, TypeVar

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from scheduler.api.bodies import media_type, read_body, unsupported
from scheduler.api.context import AdminDep, ApiContext, Context
from scheduler.api.idempotency import idempotent
from scheduler.api.models import PlanApplied, PlanDeleted, PlanListed, PlanOut, PlanRun, PlanSlotOut, PlanToggled
from scheduler.api.problems import ApiProblem, field_error, shown
from scheduler.plans.defaults import HISTORY_LIMIT
from scheduler.plans.planfile import PlanInvalid, read_plan_text
from scheduler.plans.runner import SlotContext
from scheduler.plans.views import (
    apply_specs,
    delete_named_plan,
    list_plans,
    plan_history,
    run_now,
    set_plan_enabled,
    show_plan,
)
from shared.db import utcnow
from shared.errors import InvalidInput

router = APIRouter(prefix="/v1/plans", tags=["plans"])
TOML_TYPES: Final = frozenset({"application/toml", "text/plain"})  # a plan file's text, either way
MAX_PLAN_BYTES: Final = 64 * 1024  # a plan file is a few lines; its rows live in the manifest
MAX_HISTORY: Final = 1000
TOML_BODY: Final = {
    "requestBody": {
        "required": True,
        "content": {
            media: {"schema": {"type": "string", "description": "a plan file's text"}} for media in sorted(TOML_TYPES)
        },
    }
}
T = TypeVar("T")


def _missing(name: str) -> ApiProblem:
    return ApiProblem(404, f"no plan is named {shown(name)!r}", errors=[field_error("name", name, "no such plan")])


def _named(name: str, call: Callable[[], T]) -> T:
    """`call()`, with the plans package's unknown-NAME error as a 404."""
    try:
        return call()
    except InvalidInput as e:
        if e.field == "NAME":
            raise _missing(name) from None
        raise


def _refused(e: PlanInvalid) -> ApiProblem:
    """422 naming every field at fault, as `ipab plans apply` lists them."""
    errors = [field_error(field, None, reason) for field, reason in e.problems]
    detail = "; ".join(f"{field}: {reason}" for field, reason in e.problems)
    return ApiProblem(422, f"the plan is refused: {detail}", errors=errors, kind="invalid-plan")


def _text_of(data: bytes | bytearray) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ApiProblem(400, f"the body is not UTF-8 text ({e.reason} at byte {e.start})", kind="bad-toml") from None


def _apply(ctx: ApiContext, text: str, key_id: str) -> dict[str, Any]:
    try:
        spec = read_plan_text(text, source=f"api (key {key_id})", settings=ctx.settings)
    except PlanInvalid as e:
        raise _refused(e) from None
    [applied] = apply_specs(sessions=ctx.sessions, specs=[spec], now=utcnow())
    details = show_plan(sessions=ctx.sessions, name=spec.name, now=utcnow())
    secret, warnings = applied["webhook_secret"], applied["warnings"]
    return {"change": applied["change"], **details, "webhook_secret": secret, "warnings": warnings}


@router.post("", response_model=PlanApplied, openapi_extra=TOML_BODY)
async def apply_plan(request: Request, ctx: Context, caller: AdminDep) -> Any:
    """Create or update a plan from a plan file's text (`Content-Type: application/toml`); 201 when created.

    Validated whole as `ipab plans apply` does (cron, time zone, the manifest's rows); every
    problem is named in a 422 and nothing changes.
    """
    if media_type(request) not in TOML_TYPES:
        raise unsupported(request, "application/toml or text/plain (a plan file's text)")
    async with ctx.heavy.slot(request, tenant=caller.tenant, route="POST /v1/plans"):
        data = await read_body(request, limit_bytes=MAX_PLAN_BYTES)
        text = _text_of(data)

        async def handle() -> JSONResponse:
            applied = await run_in_threadpool(_apply, ctx, text, caller.key_id)
            return JSONResponse(applied, status_code=201 if applied["change"] == "created" else 200)

        return await idempotent(request, ctx, tenant=caller.tenant, content=data, handle=handle)


@router.get("", response_model=list[PlanListed])
async def get_plans(ctx: Context, _caller: AdminDep) -> Any:
    """Every plan by name: state, next slot, newest slot with its status and counts."""
    return await run_in_threadpool(lambda: list_plans(sessions=ctx.sessions, now=utcnow()))


@router.get("/{name}", response_model=PlanOut)
async def get_plan(name: str, ctx: Context, _caller: AdminDep) -> Any:
    """One plan's settings and its next slots."""
    return await run_in_threadpool(_named, name, lambda: show_plan(sessions=ctx.sessions, name=name, now=utcnow()))


@router.get("/{name}/history", response_model=list[PlanSlotOut])
async def get_history(
    name: str, ctx: Context, _caller: AdminDep, limit: Annotated[int, Query(ge=1, le=MAX_HISTORY)] = HISTORY_LIMIT
) -> Any:
    """The plan's slots, newest first: batch and counts, or why the slot was skipped or failed."""
    return await run_in_threadpool(_named, name, lambda: plan_history(sessions=ctx.sessions, name=name, limit=limit))


def _run(ctx: ApiContext, name: str) -> dict[str, Any]:
    slot_ctx = SlotContext(settings=ctx.settings, sessions=ctx.sessions, now=utcnow)
    outcome = _named(name, lambda: run_now(slot_ctx, name=name))
    if outcome.status != "submitted" or outcome.batch_id is None:
        reason = outcome.reason or "another run took this slot"
        detail = f"the run of slot {outcome.batch_name} {outcome.status}: {reason} (see the plan's history)"
        raise ApiProblem(422 if outcome.status == "failed" else 409, detail, kind="plan-run")
    return {
        "status": outcome.status,
        "batch_id": outcome.batch_id,
        "batch_name": outcome.batch_name,
        "added": outcome.added,
    }


@router.post("/{name}/run", status_code=202, response_model=PlanRun)
async def run_plan(name: str, request: Request, ctx: Context, caller: AdminDep) -> Any:
    """An extra run now, as its own slot (`<plan>@<now>`): its batch, in the plan's tenant."""

    async def handle() -> JSONResponse:
        return JSONResponse(await run_in_threadpool(_run, ctx, name), status_code=202)

    return await idempotent(request, ctx, tenant=caller.tenant, content=b"run", handle=handle)


def _toggle(ctx: ApiContext, name: str, *, enabled: bool) -> dict[str, Any]:
    now = utcnow()
    changed = _named(name, lambda: set_plan_enabled(sessions=ctx.sessions, name=name, enabled=enabled, now=now))
    return {"changed": changed, **show_plan(sessions=ctx.sessions, name=name, now=now)}


@router.post("/{name}/pause", response_model=PlanToggled)
async def pause_plan(name: str, request: Request, ctx: Context, caller: AdminDep) -> Any:
    """Stop running the plan's slots (its history stays)."""

    async def handle() -> JSONResponse:
        return JSONResponse(await run_in_threadpool(lambda: _toggle(ctx, name, enabled=False)))

    return await idempotent(request, ctx, tenant=caller.tenant, content=b"pause", handle=handle)


@router.post("/{name}/resume", response_model=PlanToggled)
async def resume_plan(name: str, request: Request, ctx: Context, caller: AdminDep) -> Any:
    """Run the plan's slots again, from now on (slots missed while paused are not caught up)."""

    async def handle() -> JSONResponse:
        return JSONResponse(await run_in_threadpool(lambda: _toggle(ctx, name, enabled=True)))

    return await idempotent(request, ctx, tenant=caller.tenant, content=b"resume", handle=handle)


@router.delete("/{name}", response_model=PlanDeleted)
async def delete_plan(name: str, ctx: Context, _caller: AdminDep) -> Any:
    """Delete the plan and its slot history; its batches and their jobs stay."""
    slots = await run_in_threadpool(_named, name, lambda: delete_named_plan(sessions=ctx.sessions, name=name))
    return {"name": name, "deleted_slots": slots}
