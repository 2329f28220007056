"""`/healthz` (the process answers) and `/readyz` (SQL, Redis and S3 answer); no auth.

Anybody can ask `/readyz`, and each check is a SQL query, a Redis PING and an S3 request: its
answer is kept for READY_CACHE_S and made by one request at a time, so a flood of probes costs
the services one check a second, whatever its rate. Failures are shown with any credentials in
them masked (an S3 endpoint's error quotes its URL).
"""

from __future__ import annotations

import time
from typing import Any, Final

from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text
from starlette.concurrency import run_in_threadpool

from scheduler.api.context import ApiContext, Context
from shared.redact import mask_text

router = APIRouter(tags=["health"])
READY_CACHE_S: Final = 1.0  # a /readyz answer is given again for this long (probes come every few seconds)


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
            results[name] = mask_text(f"{type(e).__name__}: {e}")[:300]
    return results


def _fresh(ctx: ApiContext) -> dict[str, str] | None:
    """The last checks' results if made less than READY_CACHE_S ago."""
    last = ctx.readiness
    return last[1] if last is not None and time.monotonic() - last[0] < READY_CACHE_S else None


def _checks_once(ctx: ApiContext) -> dict[str, str]:
    """The checks' results if fresh; else made now, by one thread at a time (one that waited
    takes the results it waited for)."""
    with ctx.readiness_lock:
        checks = _fresh(ctx)
        if checks is None:
            checks = _checks(ctx)
            ctx.readiness = (time.monotonic(), checks)
        return checks


@router.get("/readyz")
async def readyz(ctx: Context) -> JSONResponse:
    """200 when SQL, Redis and S3 all answer; 503 naming the ones that do not."""
    checks = _fresh(ctx)
    if checks is None and ctx.readiness_lock.locked() and ctx.readiness is not None:
        checks = ctx.readiness[1]  # being checked (a service may hang): no thread waits on it meanwhile
    if checks is None:
        checks = await run_in_threadpool(_checks_once, ctx)
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse(
        {"status": "ready" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )
