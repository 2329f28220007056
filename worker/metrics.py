"""Prometheus metrics of a worker, served on `IPAB_METRICS_PORT` (0: off).

Where they are served: from the Celery pool child, which is the one process that runs jobs
(`ipab worker` runs prefork with concurrency 1). The child starts the HTTP server when it
has built its context, so every counter lives in one process and no multiprocess mode
(PROMETHEUS_MULTIPROC_DIR, shared files) is needed. A pool child that dies is replaced by a
new one that serves the same port again, with its counters back at zero: Prometheus's
`rate()` and `increase()` treat that as a counter reset.

Images per second is not a gauge: it is `rate(ipab_jobs_finished_total{status="succeeded"}[1m])`
(one job makes one image), which Prometheus computes exactly over any window, where a
gauge would only show what the worker last averaged.

The hooks below are no-ops in a process that installed no metrics (tests that run the
runner in-process, `ipab generate`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Final

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from shared.cache_stats import CacheStats
from shared.janitor.loop import JanitorReport
from shared.janitor.metrics import JanitorMetrics
from shared.jobs import JobResult

log = logging.getLogger(__name__)

# From a tiny model's tenth of a second to a large render's minutes.
SECONDS_BUCKETS: Final = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 900.0, 1800.0)
# Queue waits run from milliseconds (an idle fleet) to hours (a bulk backlog).
WAIT_BUCKETS: Final = (0.01, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 4 * 3600.0, 12 * 3600.0)
CACHE_LEVELS: Final = ("lru", "redis", "store")


@dataclass
class WorkerMetrics:
    """The metrics of one worker process, on their own registry, labelled with its model set."""

    model_set: str
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)

    def __post_init__(self) -> None:
        r, ms = self.registry, ["model_set"]
        self.jobs_finished = Counter(
            "ipab_jobs_finished", "Jobs this worker finished, by final status", [*ms, "status"], registry=r
        )
        self.render_seconds = self._histogram("ipab_render_seconds", "Denoising time per job")
        self.encode_seconds = self._histogram("ipab_encode_seconds", "Reference embeddings per job (cache or encoder)")
        self.upload_seconds = self._histogram("ipab_upload_seconds", "Uploading a job's PNG to object storage")
        self.queue_wait_seconds = Histogram(
            "ipab_queue_wait_seconds", "From submission to claim", ms, buckets=WAIT_BUCKETS, registry=r
        )
        self.cache_lookups = Counter(
            "ipab_embedding_cache_lookups", "Embedding cache lookups", ["level", "result"], registry=r
        )
        self.batch_size = Gauge("ipab_render_batch_size", "Jobs in the last job's pipeline call", ms, registry=r)
        self.janitor = JanitorMetrics(r)  # counted by the worker whose janitor holds the fleet's lock
        # Once per pipeline call, however many jobs share it: the sum of the jobs' `gpu_s` (metering).
        self.device_busy_seconds = Counter(
            "ipab_device_busy_seconds", "Time the device spent in pipeline calls", ms, registry=r
        )
        self._gpu_gauges()

    def _histogram(self, name: str, doc: str) -> Histogram:
        return Histogram(name, doc, ["model_set"], buckets=SECONDS_BUCKETS, registry=self.registry)

    def _gpu_gauges(self) -> None:
        """GPU memory, read at scrape time; absent on a worker without CUDA."""
        import torch

        if not torch.cuda.is_available():
            return
        allocated = Gauge("ipab_gpu_memory_allocated_bytes", "Memory held by tensors", registry=self.registry)
        reserved = Gauge("ipab_gpu_memory_reserved_bytes", "Memory held by torch's allocator", registry=self.registry)
        allocated.set_function(lambda: float(torch.cuda.memory_allocated()))
        reserved.set_function(lambda: float(torch.cuda.memory_reserved()))

    def serve(self, port: int) -> None:
        """Serve /metrics on `port` (all interfaces) from a daemon thread."""
        start_http_server(port, registry=self.registry)
        log.info("metrics on :%d/metrics", port)


class _Installed:
    """The metrics of this process, once `install` ran (Celery gives hooks no other place)."""

    metrics: WorkerMetrics | None = None


def install(*, model_set: str, port: int) -> WorkerMetrics:
    """Build this process's metrics and, when `port` is not 0, serve them."""
    metrics = WorkerMetrics(model_set=model_set)
    if port:
        metrics.serve(port)
    _Installed.metrics = metrics
    return metrics


def job_failed() -> None:
    """Count a job this worker failed for good (`status="failed"`).

    Canceled jobs are not counted here: the API or CLI that cancels finishes them, and a
    worker cannot tell a cancel from a take-over when its lease is lost."""
    if (m := _Installed.metrics) is not None:
        m.jobs_finished.labels(m.model_set, "failed").inc()


def job_published(result: JobResult) -> None:
    """A job succeeded: count it and observe its step times."""
    if (m := _Installed.metrics) is None:
        return
    m.jobs_finished.labels(m.model_set, "succeeded").inc()
    m.render_seconds.labels(m.model_set).observe(result.denoise_s)
    m.encode_seconds.labels(m.model_set).observe(result.encode_s)
    m.upload_seconds.labels(m.model_set).observe(result.upload_s)
    if result.render_batch_size is not None:
        m.batch_size.labels(m.model_set).set(result.render_batch_size)


def device_busy(seconds: float) -> None:
    """One pipeline call kept the device busy for `seconds`."""
    if (m := _Installed.metrics) is not None:
        m.device_busy_seconds.labels(m.model_set).inc(seconds)


def job_claimed(queue_wait_s: float | None) -> None:
    """A job was claimed after waiting `queue_wait_s` since its submission (None: unknown)."""
    if (m := _Installed.metrics) is not None and queue_wait_s is not None:
        m.queue_wait_seconds.labels(m.model_set).observe(max(0.0, queue_wait_s))


def cache_used(stats: CacheStats) -> None:
    """Count one embedding-cache call's hits and misses per level."""
    if (m := _Installed.metrics) is None:
        return
    for level in CACHE_LEVELS:
        for counter, result in (("hits", "hit"), ("misses", "miss")):
            count = getattr(stats, f"{level}_{counter}")
            if count:
                m.cache_lookups.labels(level, result).inc(count)


def janitor_observed(report: JanitorReport | None) -> None:
    """Count a janitor pass of this worker (None: another process holds the janitor's lock)."""
    if (m := _Installed.metrics) is not None:
        m.janitor.observe(report)
