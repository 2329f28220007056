"""The janitor's Prometheus metrics, on whatever registry serves them: a worker's
(`worker.metrics`), or `ipab reconcile --loop`'s own on IPAB_METRICS_PORT.

Only the process holding the janitor's lock counts anything; the others report a lag of 0,
so `max(ipab_janitor_lag_seconds)` over the fleet is the janitor's lag, and
`sum(rate(ipab_janitor_objects_deleted_total[5m]))` what it deletes.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge

from shared.janitor.loop import JanitorReport


class JanitorMetrics:
    """Objects and bytes deleted, rows purged, and the lag (the oldest expiry not yet acted on)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.objects_deleted = Counter(
            "ipab_janitor_objects_deleted",
            "Objects the janitor deleted (outputs, images, embeddings)",
            registry=registry,
        )
        self.bytes_deleted = Counter("ipab_janitor_bytes_deleted", "Bytes of those objects", registry=registry)
        self.jobs_removed = Counter(
            "ipab_janitor_jobs_removed", "Jobs whose objects the janitor removed", registry=registry
        )
        self.rows_purged = Counter(
            "ipab_janitor_rows_purged", "Job rows deleted (deletions, the metadata's retention)", registry=registry
        )
        self.lag_seconds = Gauge(
            "ipab_janitor_lag_seconds",
            "How long ago the oldest expiry not yet acted on passed (0 in processes not holding the lock)",
            registry=registry,
        )

    def observe(self, report: JanitorReport | None) -> None:
        """Count one pass (None: this process is not the janitor now)."""
        if report is None:
            self.lag_seconds.set(0.0)
            return
        self.objects_deleted.inc(report.objects_deleted)
        self.bytes_deleted.inc(report.bytes_deleted)
        self.jobs_removed.inc(report.jobs_removed)
        self.rows_purged.inc(report.rows_purged)
        if report.complete:
            self.lag_seconds.set(report.lag_s)
