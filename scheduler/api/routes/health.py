"""`/healthz` (the process answers) and `/readyz` (SQL, Redis and S3 answer); no auth."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from scheduler.api.context import ApiContext, Context

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


def _sql(ctx: ApiContext) -> None:
    with ctx.engine.connect() as conn:
        conn.execute(text("SELECT 1"))


def _checks(ctx: ApiContext) -> dict[str, str]:
    results: dict[str, str] = {}
    probes: dict[str, Any] = {
        "sql": lambda: _sql(ctx),
        "redis": ctx.redis.ping,
        "s3": lambda: ctx.store.exists("readyz-probe"),
    }
    for name, probe in probes.items():
        try:
            probe()
            results[name] = "ok"
        except Exception as e:  # any failure means not ready; the reason is reported
            results[name] = f"{type(e).__name__}: {e}"[:300]
    return results


@router.get("/readyz")
async def readyz(ctx: Context) -> JSONResponse:
    """200 when SQL, Redis and S3 all answer; 503 naming the ones that do not."""
    checks = await run_in_threadpool(_checks, ctx)
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )
