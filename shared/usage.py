"""Usage metering in SQL: what an attempt used, and the rollup that the transactions ending jobs keep.

Every job's row carries its usage (`shared.db.Job`: `gpu_s`, `lost_gpu_s`, `steps_run`,
`pixel_steps`, `queue_s`, `total_s`), and `usage_rollup` sums it per tenant, UTC day, batch
and lane, so that a report or a quota check reads a row per batch and day instead of a row
per job.

Counted once, in the transaction that ends the job: the worker's fenced finish (succeeded),
a failure (the worker's, or the reconciler's after the last lost worker), a cancel. A fence
that fails changes no row, so adds nothing: a lost attempt is never counted as the job's.
What the row learns after its job ended (a canceled job's steps, reported by its worker when
it notices; a zombie attempt's seconds) is added to the row and to the rollup together
(`roll_up_late`), dated the day it was learnt.

Billed and not: `gpu_s` is the device time of the attempt that ended the job (a succeeded
render, or a canceled one's steps); `lost_gpu_s` is the device time of attempts that did not
(killed, taken over, given back after a fault, failed): shown, never billed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime, time, timedelta
from typing import Any, Final, cast

from sqlalchemy import ColumnElement, Integer, Table, bindparam, case, func, literal, select
from sqlalchemy.orm import Session

from shared.db import Batch, Job, JobStatus, UsageRollup
from shared.db_clock import server_now

ROLLUP_KEY: Final = ("tenant", "day", "batch_id", "lane")
_ROLLUP: Final = cast(Table, UsageRollup.__table__)
_JOBS: Final = cast(Table, Job.__table__)
# What the folded finish's UPDATE returns for the rollup to sum (`finish_and_roll_up`).
RETURNED_FOR_ROLLUP: Final = ("batch_id", "lane", "finished_at", "status", "gpu_s", "lost_gpu_s", "pixel_steps")
RETURNED_FOR_ROLLUP_S: Final = ("queue_s", "total_s")


@dataclass(frozen=True)
class AttemptUsage:
    """What one attempt of a job used: its device seconds, and the denoising steps it ran at its size."""

    gpu_s: float
    steps_run: int
    pixels: int  # width x height

    @property
    def pixel_steps(self) -> int:
        """width x height x steps: a unit of work that does not depend on the card."""
        return self.pixels * self.steps_run


def _ended_sums() -> dict[str, ColumnElement[Any]]:
    """Per rollup key, the usage of the jobs that ended: `_one_job_sums` summed over them."""
    return {name: func.count() if name == "jobs" else func.sum(one) for name, one in _one_job_sums().items()}


def _one_job_sums(jobs: Any = None) -> dict[str, ColumnElement[Any]]:
    """One ended job's usage (NULLs of an unmetered job as 0), from `jobs` (default the `jobs` table's
    columns; `finish_and_roll_up` passes its UPDATE's RETURNING columns). The statements that end one
    job add its row as it is: an aggregate and its GROUP BY cost PostgreSQL about 18 µs of the
    finish's 200 (`bench.job_cost`), for nothing when the group is one row."""
    c = jobs if jobs is not None else _JOBS.c
    succeeded = c.status == JobStatus.succeeded.value
    return {
        "jobs": literal(1, Integer()),
        "images": case((succeeded, 1), else_=0),
        "gpu_s": func.coalesce(c.gpu_s, 0.0),
        "lost_gpu_s": func.coalesce(c.lost_gpu_s, 0.0),
        "pixel_steps": func.coalesce(c.pixel_steps, 0),
        "queue_s": func.coalesce(case((succeeded, c.queue_s), else_=0.0), 0.0),
        "total_s": func.coalesce(case((succeeded, c.total_s), else_=0.0), 0.0),
    }


def _late_sums() -> dict[str, ColumnElement[Any]]:
    """One job's usage learnt after it ended: bound values, no job or image counted again."""
    return {
        "jobs": literal(0, Integer()),
        "images": literal(0, Integer()),
        "gpu_s": bindparam("p_gpu_s", type_=UsageRollup.gpu_s.type),
        "lost_gpu_s": bindparam("p_lost_gpu_s", type_=UsageRollup.lost_gpu_s.type),
        "pixel_steps": bindparam("p_pixel_steps", type_=UsageRollup.pixel_steps.type),
        "queue_s": literal(0.0),
        "total_s": literal(0.0),
    }


def _rollup_upsert(
    dialect: str, *, day: ColumnElement[Any], sums: dict[str, ColumnElement[Any]], where: Any, grouped: bool = True
) -> Any:
    """INSERT INTO usage_rollup SELECT <the jobs' sums per key> ... ON CONFLICT add them to the row there."""
    # The dialects imported here, where they are used: a command on SQLite loads no PostgreSQL code.
    from sqlalchemy.dialects import postgresql, sqlite

    keys = [Batch.tenant, day, Job.batch_id, Job.lane, Batch.model_set]
    rows = (
        select(*keys, *sums.values())
        .select_from(Job)
        .join(Batch, Batch.id == Job.batch_id)
        .where(where)  # SQLite's upsert needs the SELECT to have a WHERE (its parser's ambiguity)
    )
    if grouped:  # one row per key: PostgreSQL refuses to update a row twice in one upsert
        rows = rows.group_by(*keys)
    insert: Any = {"postgresql": postgresql.insert, "sqlite": sqlite.insert}.get(dialect)
    if insert is None:
        raise ValueError(f"database dialect {dialect!r} is not supported; use SQLite or PostgreSQL")
    stmt = insert(_ROLLUP).from_select([*ROLLUP_KEY, "model_set", *sums], rows)
    return stmt.on_conflict_do_update(
        index_elements=list(ROLLUP_KEY), set_={name: _ROLLUP.c[name] + stmt.excluded[name] for name in sums}
    )


# Built once per dialect: the finish runs this for every job, and building the statement cost more than running it.
_ONE_ENDED: dict[str, Any] = {}
_ONE_LATE: dict[str, Any] = {}


def roll_up_job(session: Session, job_id: str) -> None:
    """Add one job that ended in this transaction to the rollup, on the day it ended."""
    dialect = session.get_bind().dialect.name
    if dialect not in _ONE_ENDED:
        where = Job.id == bindparam("p_job_id")
        _ONE_ENDED[dialect] = _rollup_upsert(
            dialect, day=func.date(Job.finished_at), sums=_one_job_sums(), where=where, grouped=False
        )
    session.execute(_ONE_ENDED[dialect], {"p_job_id": job_id})


def roll_up_ended(session: Session, where: Any) -> None:
    """Add the jobs matching `where`, which ended in this transaction, to the rollup (a cancel, the reconciler)."""
    dialect = session.get_bind().dialect.name
    session.execute(_rollup_upsert(dialect, day=func.date(Job.finished_at), sums=_ended_sums(), where=where))


def finish_and_roll_up(update_stmt: Any) -> Any:
    """PostgreSQL: one statement that runs `update_stmt` (an UPDATE of jobs ending at most one job)
    and adds the job it ended to the rollup; it returns one row if the UPDATE changed one.

    `WITH done AS (UPDATE jobs ... RETURNING ...) INSERT INTO usage_rollup SELECT ... FROM done
    JOIN batches ... ON CONFLICT ... RETURNING 1`: the finish and its count, one round trip and
    one statement to plan instead of two; a fenced-out UPDATE returns no row, so adds nothing.
    The sums read the UPDATE's RETURNING values (a data-modifying CTE's changes are not visible
    to the rest of its statement otherwise).
    """
    from sqlalchemy.dialects import postgresql

    names = (*RETURNED_FOR_ROLLUP, *RETURNED_FOR_ROLLUP_S)
    done = update_stmt.returning(*(_JOBS.c[name] for name in names)).cte("done")
    sums = _one_job_sums(done.c)
    keys = [Batch.tenant, func.date(done.c.finished_at), done.c.batch_id, done.c.lane, Batch.model_set]
    rows = select(*keys, *sums.values()).select_from(done.join(Batch, Batch.id == done.c.batch_id))
    stmt = postgresql.insert(_ROLLUP).from_select([*ROLLUP_KEY, "model_set", *sums], rows)
    upsert = stmt.on_conflict_do_update(
        index_elements=list(ROLLUP_KEY), set_={name: _ROLLUP.c[name] + stmt.excluded[name] for name in sums}
    )
    return upsert.returning(literal(1))


def roll_up_late(
    session: Session, job_id: str, *, gpu_s: float = 0.0, lost_gpu_s: float = 0.0, pixel_steps: int = 0
) -> None:
    """Add usage that a job's row learnt after the job ended, dated today (server time)."""
    dialect = session.get_bind().dialect.name
    if dialect not in _ONE_LATE:
        where = Job.id == bindparam("p_job_id")
        _ONE_LATE[dialect] = _rollup_upsert(
            dialect, day=func.date(server_now()), sums=_late_sums(), where=where, grouped=False
        )
    params = {"p_job_id": job_id, "p_gpu_s": gpu_s, "p_lost_gpu_s": lost_gpu_s, "p_pixel_steps": pixel_steps}
    session.execute(_ONE_LATE[dialect], params)


# A job put back in the queue by hand after it ended (`ipab retry`): its ended run is in the
# rollup already, so its row starts metering again from nothing.
RESET_USAGE: Final = {
    "gpu_s": None,
    "lost_gpu_s": 0.0,
    "attempt_gpu_s": 0.0,
    "steps_run": None,
    "pixel_steps": None,
    "queue_s": None,
    "total_s": None,
}


# Quota windows: UTC days and UTC calendar months (`scheduler.usage.quotas`, the dispatcher's holds).
DAY: Final = "day"
MONTH: Final = "month"


def window_start(window: str, now: datetime) -> date:
    """The first UTC day of the day or month window that `now` (naive UTC) is in."""
    return now.date() if window == DAY else now.date().replace(day=1)


def window_reset(window: str, now: datetime) -> datetime:
    """When the window that `now` is in ends (naive UTC midnight)."""
    start = window_start(window, now)
    # Day 28 plus 4 days is in the next month whatever the month's length.
    next_month = (start.replace(day=28) + timedelta(days=4)).replace(day=1)
    return datetime.combine(start + timedelta(days=1) if window == DAY else next_month, time())


def window_of(quota: str) -> str:
    """`day` or `month`, from a quota's name (`images_per_day`, `gpu_s_per_month`...)."""
    return MONTH if quota.endswith("_month") else DAY
