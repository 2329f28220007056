"""Jobs per status of batches, counted in one query, with the render times they spent."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Final

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from shared.db import TERMINAL, Job
from shared.job_status import STATUSES as STATUSES

TIME_FIELDS: Final = ("encode_s", "denoise_s", "upload_s")
_TERMINAL_VALUES: Final = frozenset(s.value for s in TERMINAL)


@dataclass
class Tally:
    """One batch's jobs per status (every status present, zeros included) and summed seconds per stage."""

    counts: dict[str, int] = field(default_factory=lambda: dict.fromkeys(STATUSES, 0))
    seconds: dict[str, float] = field(default_factory=lambda: dict.fromkeys(TIME_FIELDS, 0.0))
    expiring: int = 0  # jobs with an expiry (finished, and not kept for ever)
    latest_expiry: datetime | None = None  # the last of their expiries
    first_started: datetime | None = None  # when its first job started (the ETA's start), None before

    @property
    def expires_at(self) -> datetime | None:
        """When the batch's last objects expire: known once every job has an expiry; None otherwise."""
        return self.latest_expiry if self.total and self.expiring == self.total else None

    @property
    def total(self) -> int:
        """Every job of the batch."""
        return sum(self.counts.values())

    @property
    def done(self) -> int:
        """Jobs in a final status (succeeded, failed, canceled)."""
        return done_of(self.counts)

    @property
    def live(self) -> int:
        """Jobs still queued or running."""
        return self.total - self.done

    def present(self) -> dict[str, int]:
        """Only the statuses some job has (what `batch.completed` events and plan views show)."""
        return {status: count for status, count in self.counts.items() if count}


def done_of(counts: Mapping[str, int]) -> int:
    """How many of `counts` are in a final status."""
    return sum(count for status, count in counts.items() if status in _TERMINAL_VALUES)


def count_jobs(*, session: Session, batch_ids: Sequence[str] | None = None) -> dict[str, Tally]:
    """A `Tally` per batch of `batch_ids` (each present, zeros for an empty one); every batch with jobs when None."""
    sums = [func.sum(getattr(Job, name)) for name in TIME_FIELDS]
    expiries = (func.count(Job.expires_at), func.max(Job.expires_at))
    # The first start comes with the counts: read apart, it was a second pass over every job of the batch.
    stmt = select(Job.batch_id, Job.status, func.count(), *expiries, func.min(Job.started_at), *sums).group_by(
        Job.batch_id, Job.status
    )
    tallies: dict[str, Tally] = {}
    if batch_ids is not None:
        tallies = {batch_id: Tally() for batch_id in batch_ids}
        stmt = stmt.where(Job.batch_id.in_(list(batch_ids)))
    for batch_id, status, count, expiring, latest, first, *seconds in session.execute(stmt).tuples():
        tally = tallies.setdefault(batch_id, Tally())
        tally.counts[status] = count
        tally.expiring += expiring
        if latest is not None and (tally.latest_expiry is None or latest > tally.latest_expiry):
            tally.latest_expiry = latest
        if first is not None and (tally.first_started is None or first < tally.first_started):
            tally.first_started = first
        for name, value in zip(TIME_FIELDS, seconds, strict=True):
            tally.seconds[name] += value or 0.0
    return tallies


def count_batch(*, session: Session, batch_id: str) -> Tally:
    """The `Tally` of one batch."""
    return count_jobs(session=session, batch_ids=[batch_id])[batch_id]
