"""A batch's counts per status, read from SQL at most once per what reading them cost, in each API process.

Counting a batch reads every one of its job rows: 30 ms of PostgreSQL CPU for 100,000 jobs on the
development machine (bench/batch_polling.py), ten times that for a million. GET /v1/batches/{id} is a poll (a progress
bar, a script waiting for the end), and at the tenant's request rate (IPAB_API_RATE_PER_S, 50 a
second) one tenant polling one such batch asked the central database for several cores, taken
from every other tenant's claims and finishes. So:

- A batch's tally is served again for COST_FACTOR times what counting it took, at most MAX_STALE_S:
  a batch of a few jobs is counted at every request (its counts are a few milliseconds old at
  most), one of 100,000 about every 0.6 s, one of millions once every MAX_STALE_S. Counting one
  batch then costs the database at most 1/COST_FACTOR of a core per API process, however often it
  is asked for.
- A tenant's GETs count one thing at a time in each process: a GET that needs a count while another
  of its tenant's is counting waits for it (that count may be the very one it needs), up to WAIT_S,
  and is then refused with 429 (`busy`) and `Retry-After`. It waits on the event loop, holding no
  thread of the request pool and no SQL connection. A tenant polling many large batches keeps at
  most one database backend busy per API process, not one per request.
- What a request itself changed (cancel, retry) is counted anew for its answer (`recount`), in the
  tenant's slot for actions: those run in a thread of their own already.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Final

from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from scheduler.api.problems import ApiProblem
from scheduler.batches.counts import Tally, count_jobs
from shared.jobs import transaction

COST_FACTOR: Final = 20.0
MAX_STALE_S: Final = 10.0
WAIT_S: Final = 2.0
RETRY_AFTER_S: Final = 1
MAX_ENTRIES: Final = 10_000


class Tallies:
    """The process's batch tallies, each kept for COST_FACTOR times its count's cost; one count per tenant at a time."""

    def __init__(
        self,
        sessions: sessionmaker[Session],
        *,
        clock: Callable[[], float] = time.monotonic,
        wait_s: float = WAIT_S,
        counter: Callable[..., dict[str, Tally]] = count_jobs,
    ) -> None:
        self._sessions = sessions
        self._clock = clock
        self._wait_s = wait_s
        self._count = counter
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, tuple[float, Tally]] = OrderedDict()  # batch id -> (until, tally)
        self._slots: dict[str, threading.Lock] = {}  # tenant -> its one action's count in flight
        self._async_slots: dict[str, asyncio.Lock] = {}  # tenant -> its one GET's count in flight

    def cached(self, batch_ids: Sequence[str]) -> dict[str, Tally]:
        """The tallies of `batch_ids` that are still fresh enough to serve."""
        now = self._clock()
        with self._lock:
            found = {batch_id: self._entries.get(batch_id) for batch_id in batch_ids}
        return {batch_id: entry[1] for batch_id, entry in found.items() if entry is not None and entry[0] > now}

    async def read(self, tenant: str, batch_ids: Sequence[str]) -> dict[str, Tally]:
        """The tallies of `batch_ids` (for a GET): those cached as they are, the others counted in one
        query (in a thread) once `tenant`'s slot is free; 429 (`busy`) when it stayed taken for WAIT_S."""
        known = self.cached(batch_ids)
        if len(known) == len(set(batch_ids)):
            return known
        slot = self._async_slots.setdefault(tenant, asyncio.Lock())  # the event loop's: one thread uses it
        try:
            await asyncio.wait_for(slot.acquire(), self._wait_s)
        except TimeoutError:
            raise _busy(tenant) from None
        try:
            known.update(self.cached([b for b in batch_ids if b not in known]))  # the count it waited for
            missing = [b for b in dict.fromkeys(batch_ids) if b not in known]
            if missing:
                known.update(await run_in_threadpool(self._count_now, missing))
        finally:
            slot.release()
        return known

    def recount(self, tenant: str, batch_ids: Sequence[str]) -> dict[str, Tally]:
        """The tallies of `batch_ids` counted now (for an action's answer, in its thread), in `tenant`'s
        slot for actions; 429 (`busy`) when it stayed taken for WAIT_S."""
        slot = self._slot(tenant)
        if not slot.acquire(timeout=self._wait_s):
            raise _busy(tenant)
        try:
            return self._count_now(list(dict.fromkeys(batch_ids)))
        finally:
            slot.release()

    def _count_now(self, batch_ids: list[str]) -> dict[str, Tally]:
        started = self._clock()
        with transaction(self._sessions) as session:
            counted = self._count(session=session, batch_ids=batch_ids)
        now = self._clock()
        until = now + min(MAX_STALE_S, COST_FACTOR * (now - started))
        with self._lock:
            for batch_id, tally in counted.items():
                self._entries[batch_id] = (until, tally)
                self._entries.move_to_end(batch_id)
            while len(self._entries) > MAX_ENTRIES:
                self._entries.popitem(last=False)
        return counted

    def _slot(self, tenant: str) -> threading.Lock:
        with self._lock:
            return self._slots.setdefault(tenant, threading.Lock())


def _busy(tenant: str) -> ApiProblem:
    return ApiProblem(
        429,
        f"tenant {tenant!r} is already counting a large batch on this server; "
        f"ask again in {RETRY_AFTER_S} s (batch counts are shared between requests)",
        headers={"Retry-After": str(RETRY_AFTER_S)},
        kind="busy",
    )
