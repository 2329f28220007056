"""The FastAPI application: routers, problem handlers, the body-size guard, the webhook dispatcher.

`create_app(settings)` builds everything once; `ipab api` serves it with uvicorn.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from scheduler.api.context import ApiContext
from scheduler.api.idempotency import delete_expired
from scheduler.api.job_groups import JobGroups
from scheduler.api.metrics import MetricsPort, install_metrics
from scheduler.api.middleware import BodyLimit
from scheduler.api.problems import install_problem_handlers
from scheduler.api.routes import batches, health, jobs, plans, references, tenants, usage
from scheduler.webhooks.delivery import WebhookDelivery
from shared.settings import Settings

CLEANUP_EVERY_PASSES = 600


def _dispatch_loop(ctx: ApiContext, stop: threading.Event) -> None:
    passes = [0]

    def cleanup() -> None:
        passes[0] += 1
        if passes[0] % CLEANUP_EVERY_PASSES == 1:
            delete_expired(ctx=ctx)

    WebhookDelivery(settings=ctx.settings, sessions=ctx.sessions).run(stop, every_pass=cleanup)


def create_app(settings: Settings, *, dispatcher: bool = True, metrics_host: str = "127.0.0.1") -> FastAPI:
    """The API app for `settings`; with `dispatcher`, a thread delivers webhooks while it runs; with
    IPAB_API_METRICS_PORT, its metrics are served on `metrics_host` at that port while it runs."""
    ctx = ApiContext.build(settings)
    stop = threading.Event()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        thread = threading.Thread(target=_dispatch_loop, args=(ctx, stop), name="webhooks", daemon=True)
        if dispatcher:
            thread.start()
        metrics_port = MetricsPort.open(metrics, host=metrics_host, port=settings.api_metrics_port)
        try:
            yield
        finally:
            stop.set()
            if dispatcher:
                thread.join(timeout=30)
            if metrics_port is not None:
                metrics_port.close()
            await ctx.limiter.aclose()
            ctx.close()

    app = FastAPI(title="ipab", version="1", lifespan=lifespan, description=__doc__)
    app.state.ctx = ctx
    app.state.job_groups = JobGroups(ctx)
    install_problem_handlers(app)
    metrics = install_metrics(app, ctx.sessions, token=settings.metrics_token)
    for module in (health, references, jobs, batches, plans, usage, tenants):
        app.include_router(module.router)
    app.add_middleware(BodyLimit, limit_bytes=settings.api_max_body_bytes)
    return app
