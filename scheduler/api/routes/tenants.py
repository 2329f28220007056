"""`/v1/tenants/{name}/retention` (admin keys): how long a tenant's images are kept by default."""

from __future__ import annotations

from typing import Any, Final

from fastapi import APIRouter, Request
from starlette.concurrency import run_in_threadpool

from scheduler.api.bodies import read_json_object
from scheduler.api.context import AdminDep, ApiContext, Context
from scheduler.api.models import TenantRetention
from scheduler.api.problems import from_invalid_input, invalid
from scheduler.tenants import check_tenant_name, set_retention, tenant_defaults
from shared.errors import InvalidInput
from shared.jobs import transaction
from shared.retention import FIELD, format_duration, parse_duration

router = APIRouter(prefix="/v1/tenants", tags=["tenants"])
MAX_BODY_BYTES: Final = 4096


def retention_view(ctx: ApiContext, tenant: str, expires_after_s: int | None) -> dict[str, Any]:
    """The tenant's retention as the API shows it: its own (None: the fleet's), and the fleet's."""
    return {
        "tenant": tenant,
        "expires_after": None if expires_after_s is None else format_duration(expires_after_s),
        "fleet_expires_after": format_duration(ctx.settings.retention_outputs_s),
    }


def _read(ctx: ApiContext, tenant: str) -> dict[str, Any]:
    with transaction(ctx.sessions) as session:
        return retention_view(ctx, tenant, tenant_defaults(session=session, tenant=tenant).expires_after_s)


def _write(ctx: ApiContext, tenant: str, expires_after_s: int | None) -> dict[str, Any]:
    with transaction(ctx.sessions) as session:
        set_retention(session=session, tenant=tenant, expires_after_s=expires_after_s)
    return retention_view(ctx, tenant, expires_after_s)


def _checked(name: str) -> str:
    try:
        return check_tenant_name(name, field="name")
    except InvalidInput as e:
        raise from_invalid_input(e) from None


@router.get("/{name}/retention", response_model=TenantRetention)
async def get_retention(name: str, ctx: Context, _caller: AdminDep) -> Any:
    """The tenant's default retention (null: the fleet's, IPAB_RETENTION_OUTPUTS_S)."""
    return await run_in_threadpool(_read, ctx, _checked(name))


@router.put("/{name}/retention", response_model=TenantRetention)
async def put_retention(name: str, request: Request, ctx: Context, _caller: AdminDep) -> Any:
    """Set it: `{"expires_after": "30d"}` (1h to 3650d, or "never"); null goes back to the fleet's.

    Applies to jobs submitted from now on: a job keeps the retention it was submitted with.
    """
    body = await read_json_object(request, limit_bytes=MAX_BODY_BYTES)
    if set(body) != {FIELD}:
        raise invalid(FIELD, sorted(body), f'the body is one field, e.g. {{"{FIELD}": "30d"}} (null: the fleet\'s)')
    value = body[FIELD]
    try:
        seconds = None if value is None else parse_duration(value)
    except InvalidInput as e:
        raise from_invalid_input(e) from None
    return await run_in_threadpool(_write, ctx, _checked(name), seconds)
