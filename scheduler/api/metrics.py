"""Prometheus metrics of the API. Their labels name tenants and model sets, so they are never
served on the API's port to anyone: on a port of their own (IPAB_API_METRICS_PORT, `MetricsPort`,
for a scraper inside the cluster), and/or at `GET /metrics` on the API's port to the bearer of
IPAB_METRICS_TOKEN; with neither set, nowhere (404 saying how to turn them on).

- Requests: `ipab_api_requests_total{method, route, status}` and
  `ipab_api_request_duration_seconds{method, route}`, by route template (`/v1/jobs/{job_id}`),
  never by raw path, so that ids do not multiply the series.
- The fleet's backlog, read from SQL at scrape time and kept for `SCRAPE_CACHE_S` so that
  several Prometheus servers scraping at once cost one query: queued jobs and the age of the
  oldest per model set, lane and tenant (`ipab_jobs_queued`, `ipab_jobs_queued_oldest_age_seconds`;
  a scaler reads these: they count what the dispatcher has not yet moved to Redis), running
  jobs per model set, and the webhook outbox backlog.
- Usage per tenant, read at scrape time with the backlog from the usage rollup (counters: they
  only grow): `ipab_tenant_gpu_seconds_total` (billed), `ipab_tenant_lost_gpu_seconds_total`,
  `ipab_tenant_images_total`, and `ipab_quota_refusals_total{tenant, quota}`.
"""

from __future__ import annotations

import hmac
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Annotated, Final
from wsgiref.simple_server import WSGIServer

from fastapi import FastAPI, Header, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scheduler.api.context import BEARER
from scheduler.api.middleware import HttpMiddleware
from scheduler.api.problems import ApiProblem
from scheduler.usage.quotas import refusals
from scheduler.usage.report import tenant_totals
from shared.db import Batch, Job, JobStatus, WebhookMessage, utcnow
from shared.errors import SettingsError

SCRAPE_CACHE_S: Final = 5.0
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
UNMATCHED_ROUTE: Final = "unmatched"
BACKLOG_LABELS: Final = ["model_set", "lane", "tenant"]
METRICS_OFF: Final = (
    "GET /metrics is not served on the API's port without a key: its labels name every tenant. Set "
    "IPAB_API_METRICS_PORT to serve it on a port of its own, or IPAB_METRICS_TOKEN to serve it here to its bearer"
)


@dataclass(frozen=True)
class Backlog:
    """One reading of the fleet's backlog from SQL."""

    queued: list[tuple[str, str, str, int, float]]  # model set, lane, tenant, count, oldest age (s)
    running: list[tuple[str, int]]  # model set, count
    outbox: int  # webhook messages neither delivered nor given up
    usage: list[tuple[str, float, float, int]] = field(default_factory=list)  # tenant, GPU-s, lost GPU-s, images
    refusals: list[tuple[str, str, int]] = field(default_factory=list)  # tenant, quota, submissions refused


def read_backlog(sessions: sessionmaker[Session]) -> Backlog:
    """Queued jobs by model set, lane and tenant (with the oldest's age), running jobs, outbox."""
    now = utcnow()
    queued_q = (
        select(Batch.model_set, Job.lane, Batch.tenant, func.count(), func.min(Job.queued_at))
        .select_from(Job)
        .join(Batch, Batch.id == Job.batch_id)
        .where(Job.status == JobStatus.queued.value)
        .group_by(Batch.model_set, Job.lane, Batch.tenant)
    )
    running_q = (
        select(Batch.model_set, func.count())
        .select_from(Job)
        .join(Batch, Batch.id == Job.batch_id)
        .where(Job.status == JobStatus.running.value)
        .group_by(Batch.model_set)
    )
    outbox_q = select(func.count()).where(WebhookMessage.delivered_at.is_(None), WebhookMessage.failed_at.is_(None))
    with sessions() as session:
        queued = [
            (m, lane, tenant, int(n), max(0.0, (now - oldest).total_seconds()) if oldest else 0.0)
            for m, lane, tenant, n, oldest in session.execute(queued_q).tuples()
        ]
        running = [(m, int(n)) for m, n in session.execute(running_q).tuples()]
        outbox = int(session.scalar(outbox_q) or 0)
        usage = tenant_totals(session=session)
        refused = refusals(session=session)
    return Backlog(queued=queued, running=running, outbox=outbox, usage=usage, refusals=refused)


@dataclass(eq=False)  # the registry keys collectors by identity
class BacklogCollector(Collector):
    """Gauges of the backlog, read at scrape time, at most once per `cache_s`."""

    sessions: sessionmaker[Session]
    cache_s: float = SCRAPE_CACHE_S
    _read_at_s: float = field(default=float("-inf"), init=False)
    _last: Backlog | None = field(default=None, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def backlog(self) -> Backlog:
        """The last reading, or a new one when it is older than `cache_s`."""
        with self._lock:
            if self._last is None or time.monotonic() - self._read_at_s >= self.cache_s:
                self._last = read_backlog(self.sessions)
                self._read_at_s = time.monotonic()
            return self._last

    def collect(self) -> Iterator[Metric]:
        """The gauges of one scrape."""
        backlog = self.backlog()
        queued = GaugeMetricFamily("ipab_jobs_queued", "Jobs waiting to start", labels=BACKLOG_LABELS)
        oldest = GaugeMetricFamily(
            "ipab_jobs_queued_oldest_age_seconds", "Age of the oldest waiting job", labels=BACKLOG_LABELS
        )
        for model_set, lane, tenant, count, age_s in backlog.queued:
            queued.add_metric([model_set, lane, tenant], count)
            oldest.add_metric([model_set, lane, tenant], age_s)
        running = GaugeMetricFamily("ipab_jobs_running", "Jobs a worker holds", labels=["model_set"])
        for model_set, count in backlog.running:
            running.add_metric([model_set], count)
        outbox = GaugeMetricFamily("ipab_webhook_outbox_backlog", "Webhook messages not yet delivered")
        outbox.add_metric([], backlog.outbox)
        yield from (queued, oldest, running, outbox)
        yield from usage_families(backlog)

    def describe(self) -> Iterator[Metric]:
        """Nothing: describing would read SQL when the collector is registered."""
        return iter(())


def usage_families(backlog: Backlog) -> Iterator[Metric]:
    """Per tenant: billed and lost GPU-seconds and images, all time (counters read from the usage
    rollup), and submissions refused per quota."""
    names = (
        ("ipab_tenant_gpu_seconds", "GPU-seconds billed (the attempts that ended jobs)"),
        ("ipab_tenant_lost_gpu_seconds", "GPU-seconds of attempts killed, taken over or failed (not billed)"),
        ("ipab_tenant_images", "Images made"),
    )
    families = [CounterMetricFamily(name, doc, labels=["tenant"]) for name, doc in names]
    for tenant, *values in backlog.usage:
        for family, value in zip(families, values, strict=True):
            family.add_metric([tenant], value)
    refused = CounterMetricFamily("ipab_quota_refusals", "Submissions a quota refused", labels=["tenant", "quota"])
    for tenant, quota, count in backlog.refusals:
        refused.add_metric([tenant, quota], count)
    yield from (*families, refused)


@dataclass
class ApiMetrics:
    """The API's registry: request counters and the backlog collector."""

    sessions: sessionmaker[Session]
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        labels, r = ["method", "route"], self.registry
        self.requests = Counter("ipab_api_requests", "HTTP requests answered", [*labels, "status"], registry=r)
        self.latency = Histogram(
            "ipab_api_request_duration_seconds", "Time to answer", labels, buckets=LATENCY_BUCKETS, registry=r
        )
        self.registry.register(BacklogCollector(self.sessions))

    def observe(self, *, method: str, route: str, status: int, duration_s: float) -> None:
        """Count one answered request."""
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(duration_s)


class RequestMetrics(HttpMiddleware):
    """ASGI middleware counting every answered request by method, route and status."""

    def __init__(self, app: ASGIApp, *, metrics: ApiMetrics) -> None:
        super().__init__(app)
        self.metrics = metrics

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        start_s = time.perf_counter()
        status = 500  # what a request that raised is answered with (ServerErrorMiddleware)

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            route = getattr(scope.get("route"), "path", UNMATCHED_ROUTE)
            self.metrics.observe(
                method=scope["method"], route=route, status=status, duration_s=time.perf_counter() - start_s
            )


def check_scraper(token: str | None, authorization: str | None) -> None:
    """Let the bearer of `token` (IPAB_METRICS_TOKEN) through; 404 when none is set, 401 for anyone else."""
    if token is None:
        raise ApiProblem(404, METRICS_OFF, kind="metrics-off")
    match = BEARER.fullmatch((authorization or "").strip())
    if match is None or not hmac.compare_digest(match.group(1).encode(), token.encode()):
        detail = "GET /metrics needs `Authorization: Bearer <the IPAB_METRICS_TOKEN of this server>`"
        raise ApiProblem(401, detail, headers={"WWW-Authenticate": "Bearer"}, kind="unauthorized")


def install_metrics(app: FastAPI, sessions: sessionmaker[Session], *, token: str | None) -> ApiMetrics:
    """Count every request, and serve `GET /metrics` to the bearer of `token` (none: to nobody)."""
    metrics = ApiMetrics(sessions)
    app.add_middleware(RequestMetrics, metrics=metrics)

    @app.get("/metrics", include_in_schema=False)
    def scrape(authorization: Annotated[str | None, Header()] = None) -> Response:
        check_scraper(token, authorization)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return metrics


@dataclass
class MetricsPort:
    """The API's metrics on a port of their own (IPAB_API_METRICS_PORT), served by prometheus_client
    in a thread, no key asked: keep the port inside the cluster (the Service does not expose it)."""

    server: WSGIServer
    thread: threading.Thread

    @classmethod
    def open(cls, metrics: ApiMetrics, *, host: str, port: int) -> MetricsPort | None:
        """Serve `metrics` on host:port; None when `port` is 0 (no metrics port)."""
        if port == 0:
            return None
        try:
            server, thread = start_http_server(port, addr=host, registry=metrics.registry)
        except OSError as e:
            raise SettingsError(
                f"IPAB_API_METRICS_PORT={port}: cannot listen on {host}:{port} ({e.strerror}); choose a free port"
            ) from e
        return cls(server, thread)

    def close(self) -> None:
        """Stop serving and free the port."""
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
