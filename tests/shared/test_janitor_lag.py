"""The janitor's lag gauge keeps growing while its passes fail (S3 or SQL down), so that an alert on
`ipab_janitor_lag_seconds` fires when the janitor stops working, not only when it falls behind.
On SQLite and PostgreSQL where a database is involved; the clock is the test's."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path

from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session, sessionmaker

from shared.db import make_engine, make_session_factory
from shared.errors import StorageUnavailable
from shared.janitor.loop import JanitorReport, Observer, run_janitor
from shared.janitor.metrics import JanitorMetrics
from shared.storage import ObjectStore
from tests.shared.conftest import World

GAUGE = "ipab_janitor_lag_seconds"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now_s = 1000.0

    def __call__(self) -> float:
        return self.now_s


class S3Down(ObjectStore):
    """A store whose deletes fail as an unreachable S3 fails them."""

    def __init__(self, real: ObjectStore) -> None:
        super().__init__(endpoint_url=real.endpoint_url, bucket=real.bucket, region=real.region)

    def delete_many(self, keys: Sequence[str]) -> None:
        raise StorageUnavailable(f"object store at {self.where} unreachable (the test's)")


def _lag(registry: CollectorRegistry) -> float | None:
    return registry.get_sample_value(GAUGE)


def _one_pass(world: World, *, sessions: sessionmaker[Session], store: ObjectStore, observe: Observer) -> JanitorReport:
    """The janitor loop until its first observed pass (10 s at most), then stopped; that pass's report."""
    seen: list[JanitorReport | None] = []
    stop = threading.Event()

    def observed(report: JanitorReport | None) -> None:
        seen.append(report)
        observe(report)
        stop.set()

    kwargs = {"sessions": sessions, "store": store, "redis_client": world.redis, "settings": world.settings}
    loop = threading.Thread(target=run_janitor, kwargs={**kwargs, "stop": stop, "observe": observed})
    loop.start()
    stop.wait(10)
    stop.set()
    loop.join(timeout=30)
    assert seen, "the janitor's failed pass was not reported"
    (report,) = seen
    assert report is not None
    return report


def test_the_gauge_counts_on_from_the_last_reading_while_something_waits_or_passes_cannot_read_it() -> None:
    clock, registry = Clock(), CollectorRegistry()
    metrics = JanitorMetrics(registry, clock=clock)
    metrics.observe(JanitorReport(lag_s=0.0))
    clock.now_s += 100
    assert _lag(registry) == 0.0  # nothing waited: 0 holds until the next pass

    metrics.observe(JanitorReport(lag_s=30.0))
    clock.now_s += 100
    assert _lag(registry) == 130.0  # what waited 30 s then waits on

    metrics.observe(JanitorReport(lag_s=None, complete=False))  # a pass that failed before reading it
    clock.now_s += 300
    assert _lag(registry) == 430.0  # still from the last reading
    metrics.observe(JanitorReport(lag_s=None, complete=False))
    clock.now_s += 300
    assert _lag(registry) == 730.0

    metrics.observe(JanitorReport(lag_s=0.0))  # working again, and caught up
    clock.now_s += 300
    assert _lag(registry) == 0.0
    metrics.observe(JanitorReport(lag_s=None, complete=False))
    clock.now_s += 60
    assert _lag(registry) == 360.0  # failing after a reading of 0: at most as far behind as that reading is old
    metrics.observe(None)  # another process holds the lock now: it reports the lag
    clock.now_s += 300
    assert _lag(registry) == 0.0


def test_a_pass_failing_on_s3_reports_the_lag_it_reads_from_sql(world: World) -> None:
    _, jobs = world.batch("b", jobs=2)
    world.expire(jobs, ago=timedelta(minutes=10))
    clock, registry = Clock(), CollectorRegistry()
    metrics = JanitorMetrics(registry, clock=clock)

    report = _one_pass(world, sessions=world.sessions, store=S3Down(world.store), observe=metrics.observe)

    assert not report.complete and report.lag_s is not None and 590 <= report.lag_s <= 700
    assert _lag(registry) == report.lag_s
    clock.now_s += 3600  # no pass since: the expired jobs wait on, and the gauge says so
    assert _lag(registry) == report.lag_s + 3600
    assert all(getattr(world.job(j), "data_removed_at", 1) is None for j in jobs)


def test_a_pass_failing_on_sql_makes_the_gauge_grow_from_the_last_good_pass(world: World, tmp_path: Path) -> None:
    clock, registry = Clock(), CollectorRegistry()
    metrics = JanitorMetrics(registry, clock=clock)
    _, jobs = world.batch("b", jobs=1)
    world.expire(jobs, ago=timedelta(minutes=1))
    assert _one_pass(world, sessions=world.sessions, store=world.store, observe=metrics.observe).complete
    assert _lag(registry) == 0.0
    engine = make_engine(f"sqlite:///{tmp_path / 'no-such-folder' / 'ipab.db'}")  # SQL down
    try:
        report = _one_pass(world, sessions=make_session_factory(engine), store=world.store, observe=metrics.observe)
    finally:
        engine.dispose()

    clock.now_s += 3600
    assert not report.complete and report.lag_s is None
    assert _lag(registry) == 3600.0
