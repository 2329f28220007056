"""`/v1/usage` (what was used: a tenant its own, an admin key every tenant's) and `/v1/quotas`
(limits: a tenant reads its own; admin keys set and clear any tenant's).

The report and the quotas are `scheduler.usage`'s; `ipab usage` and `ipab quotas` print the same.
"""

from __future__ import annotations

from datetime import date
from typing import Annotated, Any, Literal
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool

from scheduler.api.context import ADMIN_HINT, AdminDep, ApiContext, CallerDep, Context
from scheduler.api.problems import ApiProblem, from_invalid_input
from scheduler.tenants import check_tenant_name
from scheduler.usage.quotas import clear_quotas, quota_status, set_quotas
from scheduler.usage.report import MAX_CURSOR_CHARS, MAX_PAGE_ROWS, PAGE_ROWS, UsagePage, UsageQuery, usage_report
from shared.errors import InvalidInput
from shared.jobs import transaction

router = APIRouter(tags=["usage"])
Group = Literal["day", "batch", "lane", "model_set"]


class QuotasIn(BaseModel):
    """The limits to set; a limit left out is kept, a null one is lifted."""

    model_config = ConfigDict(extra="forbid")

    images_per_day: int | None = Field(default=None, ge=0)
    images_per_month: int | None = Field(default=None, ge=0)
    # Finite: `inf` would be no limit in disguise, and is not JSON when read back.
    gpu_s_per_day: float | None = Field(
        default=None, ge=0, allow_inf_nan=False, description="GPU-seconds (billed) per UTC day"
    )
    gpu_s_per_month: float | None = Field(
        default=None, ge=0, allow_inf_nan=False, description="GPU-seconds (billed) per UTC month"
    )
    max_running: int | None = Field(default=None, ge=0, description="jobs running (or dispatched) at once")


def _forbidden_other(caller_tenant: str) -> ApiProblem:
    return ApiProblem(403, f"a key of tenant {caller_tenant!r} sees its own usage only; {ADMIN_HINT}", kind="forbidden")


def _tenant_arg(name: str) -> str:
    try:
        return check_tenant_name(name, field="tenant")
    except InvalidInput as e:
        raise from_invalid_input(e) from None


@router.get("/v1/usage")
async def get_usage(
    request: Request,
    ctx: Context,
    caller: CallerDep,
    tenant: Annotated[str | None, Query(description="an admin key: one tenant (default: every tenant)")] = None,
    since: Annotated[date | None, Query(description="first UTC day, included")] = None,
    until: Annotated[date | None, Query(description="last UTC day, included")] = None,
    by: Annotated[Group, Query(description="a row per day, batch, lane or model set")] = "day",
    limit: Annotated[int, Query(description=f"rows a page, 1 to {MAX_PAGE_ROWS:,}")] = PAGE_ROWS,
    after: Annotated[
        str | None, Query(max_length=MAX_CURSOR_CHARS, description="the `next_after` of the page before")
    ] = None,
) -> Any:
    """Usage summed per day, batch, lane or model set: jobs, images, GPU-seconds (billed), lost
    GPU-seconds (attempts killed or failed: shown, not billed), pixel-steps, queue and total seconds.
    A tenant's key sees its own usage; an admin key every tenant's, or `tenant`'s.

    At most `limit` rows, in (tenant, group) order; `next` is the link to the rows after them
    (`next_after` its cursor), null on the last page. `totals` sum the whole range, every page."""
    if not caller.admin:
        if tenant not in (None, caller.tenant):
            raise _forbidden_other(caller.tenant)
        tenant = caller.tenant
    try:
        query = UsageQuery(tenant=tenant, since=since, until=until, by=by)
        page = UsagePage(limit=limit, after=after)
    except InvalidInput as e:
        raise from_invalid_input(e) from None

    def read() -> dict[str, Any]:
        with transaction(ctx.sessions) as session:
            return usage_report(session=session, query=query, page=page).to_json()

    try:
        body = await run_in_threadpool(read)
    except InvalidInput as e:  # a cursor that is not one of this report's
        raise from_invalid_input(e) from None
    body["next"] = _next_link(request, body, admin_tenant=tenant if caller.admin else None)
    return body


def _next_link(request: Request, body: dict[str, Any], *, admin_tenant: str | None) -> str | None:
    """The path and query of the next page (the same report, `after` this page's last row), or None."""
    if body["next_after"] is None:
        return None
    names = ("since", "until", "by", "limit")
    params = {"tenant": admin_tenant, **{name: body[name] for name in names}, "after": body["next_after"]}
    return f"{request.url.path}?{urlencode({k: v for k, v in params.items() if v is not None})}"


def _status(ctx: ApiContext, tenant: str | None) -> dict[str, Any]:
    with transaction(ctx.sessions) as session:
        return quota_status(session=session, tenant=tenant)


@router.get("/v1/quotas")
async def get_quotas(ctx: Context, caller: CallerDep) -> Any:
    """Limits with what counts against each and when each resets, by tenant: the caller's own, or
    every tenant with quotas for an admin key."""
    return await run_in_threadpool(_status, ctx, None if caller.admin else caller.tenant)


@router.put("/v1/quotas/{tenant}")
async def put_quotas(tenant: str, body: QuotasIn, ctx: Context, _caller: AdminDep) -> Any:
    """Set some of a tenant's limits (admin keys): those in the body; null lifts one."""
    name = _tenant_arg(tenant)
    changes = {field: getattr(body, field) for field in body.model_fields_set}
    if not changes:
        raise ApiProblem(422, f"name at least one limit: {', '.join(QuotasIn.model_fields)}", kind="no-limit")

    def write() -> dict[str, Any]:
        try:
            with transaction(ctx.sessions) as session:
                set_quotas(session=session, tenant=name, changes=changes)
        except InvalidInput as e:  # the model let through what the quotas refuse
            raise from_invalid_input(e) from None
        return _status(ctx, name)

    return await run_in_threadpool(write)


@router.delete("/v1/quotas/{tenant}")
async def delete_quotas(tenant: str, ctx: Context, _caller: AdminDep) -> Any:
    """Lift every limit of a tenant (admin keys)."""
    name = _tenant_arg(tenant)

    def clear() -> dict[str, Any]:
        with transaction(ctx.sessions) as session:
            return {"tenant": name, "cleared": clear_quotas(session=session, tenant=name)}

    return await run_in_threadpool(clear)
