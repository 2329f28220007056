"""The janitor's Prometheus metrics, on whatever registry serves them: a worker's
(`worker.metrics`), or `ipab reconcile --loop`'s own on IPAB_METRICS_PORT.

Only the process holding the janitor's lock counts anything; the others report a lag of 0,
so `max(ipab_janitor_lag_seconds)` over the fleet is the janitor's lag, and
`sum(rate(ipab_janitor_objects_deleted_total[5m]))` what it deletes.

The lag is computed when it is scraped, from the last reading: the age of the oldest expiry
not yet acted on grows while it waits, so a reading above 0 grows until the next one; and a
pass that failed without reading it (SQL down) lets even a reading of 0 grow. An alert on
the gauge therefore fires when the janitor keeps failing, not only when it falls behind.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge

from shared.janitor.loop import JanitorReport


@dataclass(frozen=True)
class _LagReading:
    """The janitor's lag as last read, and since when the gauge counts on from it."""

    lag_s: float
    read_at_s: float  # on the metrics' clock
    grows: bool  # something waited (lag above 0), or passes failed to read it since


class JanitorMetrics:
    """Objects and bytes deleted, rows purged, and the lag (the oldest expiry not yet acted on).

    `clock` (monotonic seconds) is the one the lag grows by; tests pass their own."""

    def __init__(self, registry: CollectorRegistry, *, clock: Callable[[], float] = time.monotonic) -> None:
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
            "How long ago the oldest expiry not yet acted on passed; grows while the janitor's passes fail "
            "(0 in processes not holding the lock)",
            registry=registry,
        )
        self._clock = clock
        # Replaced whole, never changed in place: a scrape on another thread reads one reading.
        self._reading = _LagReading(0.0, clock(), grows=False)
        self.lag_seconds.set_function(self._lag_now_s)

    def observe(self, report: JanitorReport | None) -> None:
        """Count one pass (None: this process is not the janitor now)."""
        if report is None:
            self._reading = _LagReading(0.0, self._clock(), grows=False)
            return
        self.objects_deleted.inc(report.objects_deleted)
        self.bytes_deleted.inc(report.bytes_deleted)
        self.jobs_removed.inc(report.jobs_removed)
        self.rows_purged.inc(report.rows_purged)
        if report.lag_s is not None:
            self._reading = _LagReading(report.lag_s, self._clock(), grows=report.lag_s > 0)
        else:  # the pass stopped before reading it: count on from the last reading
            last = self._reading
            self._reading = _LagReading(last.lag_s, last.read_at_s, grows=True)

    def _lag_now_s(self) -> float:
        """The last reading, plus the time since it while it grows."""
        reading = self._reading
        if not reading.grows:
            return reading.lag_s
        return reading.lag_s + max(0.0, self._clock() - reading.read_at_s)
