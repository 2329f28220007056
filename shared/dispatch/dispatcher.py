"""The dispatcher: SQL holds every queued job; Redis holds only the next few, chosen by the policy.

Submission writes rows only (`enqueued_at` NULL: waiting for admission). The dispatcher keeps
each model set's Celery queue shallow (`IPAB_DISPATCH_DEPTH` messages): whenever it holds
fewer, it asks the policy (`shared.dispatch.policy`) which (lane, tenant) starts next, takes
that key's oldest undispatched job (FIFO within a tenant's lane), marks it dispatched in SQL
and pushes its message. A job that reaches a worker is never more than the queue's depth
behind one that arrived later in a higher lane.

No loss: the row is marked before the push. If the dispatcher dies between the two, the job is
`queued`, marked and absent from Redis's `queued` set: the reconciler hands it back (clears
`enqueued_at`) and it is dispatched again. A flushed Redis loses only the shallow queue, which
the reconciler hands back the same way. One dispatcher per model set works at a time (a Redis
lock that lapses when its holder dies, as the reconciler's); any worker can take over.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

import redis
from sqlalchemy import func, literal, select, tuple_, update
from sqlalchemy.orm import Session, sessionmaker

from shared import keys
from shared.db import Batch, Job, JobStatus, utcnow
from shared.db_clock import server_now
from shared.dispatch.holds import starts_left
from shared.dispatch.policy import Policy
from shared.errors import TransientError
from shared.jobs import transaction
from shared.queue import enqueue_serialized
from shared.reconcile import hold_lock, release_lock
from shared.settings import Settings
from shared.wire import message_text

log = logging.getLogger(__name__)

FETCH_CHUNK: Final = 256  # undispatched jobs read per (lane, tenant) at a time
MAX_ROUND: Final = 5000  # jobs handed to Redis in one round at most (a deep queue fills over a few)
MARK_CHUNK: Final = 1000  # job ids per UPDATE
STANDBY_CHECKS: Final = 5  # lock checks per IPAB_DISPATCH_LOCK_S by a replica that holds none
# A burst of submissions (each bumps the wake counter) re-reads the backlog at most this often.
MIN_RESCAN_S: Final = 0.05
Key = tuple[str, str]  # (lane, tenant)


@dataclass(frozen=True)
class Waiting:
    """A queued job not yet handed to Redis."""

    job_id: str
    batch_id: str
    spec: str
    queued_at: datetime
    line: int


def _undispatched(model_set: str) -> Any:
    return (
        Job.status == JobStatus.queued.value,
        Job.enqueued_at.is_(None),
        Batch.model_set == model_set,
        Batch.paused.is_(False),
    )


def backlog(*, sessions: sessionmaker[Session], model_set: str) -> dict[Key, list[tuple[str, int]]]:
    """Queued, undispatched jobs of unpaused batches: per (lane, tenant), (batch id, count) oldest batch first."""
    stmt = (
        select(Job.lane, Batch.tenant, Batch.id, func.count())
        .join(Batch, Batch.id == Job.batch_id)
        .where(*_undispatched(model_set))
        .group_by(Job.lane, Batch.tenant, Batch.id, Batch.created_at)
        .order_by(Batch.created_at, Batch.id)
    )
    found: dict[Key, list[tuple[str, int]]] = {}
    with transaction(sessions) as session:
        for lane, tenant, batch_id, n in session.execute(stmt):
            found.setdefault((lane, tenant), []).append((batch_id, int(n)))
    return found


def backlog_counts(*, sessions: sessionmaker[Session], model_set: str) -> dict[Key, int]:
    """Queued, undispatched jobs of unpaused batches per (lane, tenant) of one model set."""
    return {key: sum(n for _, n in batches) for key, batches in backlog(sessions=sessions, model_set=model_set).items()}


def queued_model_sets(*, sessions: sessionmaker[Session]) -> list[str]:
    """The model sets with queued jobs (what a dedicated dispatch loop serves)."""
    stmt = select(Batch.model_set).join(Job, Job.batch_id == Batch.id).where(Job.status == JobStatus.queued.value)
    with transaction(sessions) as session:
        return sorted(set(session.scalars(stmt.distinct())))


def next_waiting(
    *, sessions: sessionmaker[Session], batch_id: str, lane: str, limit: int, after: Waiting | None = None
) -> list[Waiting]:
    """The oldest undispatched jobs of one batch in one lane, FIFO: by submission, then manifest line.

    `after`: continue past this job (keyset paging), for jobs taken in this round but not yet marked.
    """
    stmt = (
        select(Job.id, Job.batch_id, Job.spec, Job.queued_at, Job.line)
        .where(
            Job.batch_id == batch_id,
            Job.status == JobStatus.queued.value,
            Job.lane == lane,
            Job.enqueued_at.is_(None),
        )
        .order_by(Job.queued_at, Job.line)
        .limit(limit)
    )
    if after is not None:
        stmt = stmt.where(tuple_(Job.queued_at, Job.line) > tuple_(literal(after.queued_at), literal(after.line)))
    with transaction(sessions) as session:
        return [
            Waiting(job_id=r[0], batch_id=r[1], spec=r[2], queued_at=r[3], line=r[4]) for r in session.execute(stmt)
        ]


def mark_dispatched(*, sessions: sessionmaker[Session], job_ids: Sequence[str]) -> set[str]:
    """Stamp `enqueued_at` (server time) on those still queued and undispatched; returns their ids."""
    marked: set[str] = set()
    with transaction(sessions) as session:
        for start in range(0, len(job_ids), MARK_CHUNK):
            chunk = list(job_ids[start : start + MARK_CHUNK])
            stmt = (
                update(Job)
                .where(Job.id.in_(chunk), Job.status == JobStatus.queued.value, Job.enqueued_at.is_(None))
                .values(enqueued_at=server_now())
                .returning(Job.id)
                .execution_options(synchronize_session=False)
            )
            marked.update(session.scalars(stmt))
    return marked


@dataclass
class Dispatcher:
    """Feeds one model set's Celery queue in policy order, a few messages deep."""

    sessions: sessionmaker[Session]
    redis_client: redis.Redis
    settings: Settings
    model_set: str
    policy: Policy = field(default_factory=Policy)
    _buffers: dict[Key, list[Waiting]] = field(default_factory=dict)
    _batches: dict[Key, list[tuple[str, int]]] = field(default_factory=dict)
    _counts: dict[Key, int] = field(default_factory=dict)
    _taken: dict[Key, Waiting] = field(default_factory=dict)  # the last job handed out per key
    # Held tenants (quotas): how many more jobs each may start until the next re-read (shared.dispatch.holds).
    _starts_left: dict[str, int] = field(default_factory=dict)
    _rescanned_at: float = 0.0
    _wake_stamp: bytes | None = None

    @classmethod
    def from_settings(
        cls, *, sessions: sessionmaker[Session], redis_client: redis.Redis, settings: Settings, model_set: str
    ) -> Dispatcher:
        """A dispatcher whose policy has the configured lane and tenant weights."""
        policy = Policy(lane_weights=settings.lane_weights, tenant_weights=settings.tenant_weights)
        return cls(sessions=sessions, redis_client=redis_client, settings=settings, model_set=model_set, policy=policy)

    def _fill(self, key: Key) -> list[Waiting]:
        """The key's next jobs from its oldest batch that still has some (FIFO within a tenant's lane)."""
        batches = self._batches.get(key, [])
        while batches:
            batch_id = batches[0][0]
            last = self._taken.get(key)
            after = last if last is not None and last.batch_id == batch_id else None
            buffer = next_waiting(
                sessions=self.sessions, batch_id=batch_id, lane=key[0], limit=FETCH_CHUNK, after=after
            )
            if len(buffer) < FETCH_CHUNK:
                batches.pop(0)  # this batch has nothing beyond what was just read
            if buffer:
                self._buffers[key] = buffer
                return buffer
        return []

    @property
    def queue(self) -> str:
        """The Celery queue this dispatcher feeds."""
        return keys.render_queue(self.model_set)

    def rescan(self) -> None:
        """Re-read the backlog from SQL (new submissions, re-queued and resumed jobs)."""
        self._batches = backlog(sessions=self.sessions, model_set=self.model_set)
        self._counts = {key: sum(n for _, n in batches) for key, batches in self._batches.items()}
        self._buffers = {}  # re-read: a buffer may hold jobs since canceled, paused or dispatched
        self._taken = {}
        self._starts_left = starts_left(sessions=self.sessions, now=utcnow())
        self._rescanned_at = time.monotonic()

    def dispatch_once(self) -> int:
        """Top the queue up to its depth in policy order; returns how many jobs were dispatched."""
        pipe = self.redis_client.pipeline(transaction=False)
        pipe.llen(self.queue)
        pipe.get(wake_key(self.settings, self.model_set))
        depth, wake_stamp = pipe.execute()
        room = min(self.settings.dispatch_depth - int(depth), MAX_ROUND)
        if room <= 0:
            return 0
        since_s = time.monotonic() - self._rescanned_at
        woken = wake_stamp != self._wake_stamp and since_s >= MIN_RESCAN_S
        if woken or since_s >= self.settings.dispatch_rescan_s:
            self._wake_stamp = wake_stamp
            self.rescan()
        chosen = self._choose(room)
        if not chosen:
            return 0
        marked = mark_dispatched(sessions=self.sessions, job_ids=[w.job_id for w in chosen])
        texts = [
            (w.job_id, message_text(job_id=w.job_id, batch_id=w.batch_id, spec_json=w.spec))
            for w in chosen
            if w.job_id in marked
        ]
        if texts:
            enqueue_serialized(
                redis_client=self.redis_client, queue=self.queue, messages=texts, prefix=self.settings.redis_prefix
            )
        return len(texts)

    def _choose(self, room: int) -> list[Waiting]:
        chosen: list[Waiting] = []
        for key in self.policy.order(self._counts, room, caps=self._starts_left):
            waiting = self._take(key)
            if waiting is not None:
                chosen.append(waiting)
                if key[1] in self._starts_left:  # a held tenant: one start fewer until the next re-read
                    self._starts_left[key[1]] -= 1
        return chosen

    def _take(self, key: Key) -> Waiting | None:
        buffer = self._buffers.get(key) or self._fill(key)
        if not buffer:
            self._counts.pop(key, None)
            return None
        self._counts[key] = max(self._counts.get(key, 1) - 1, 0)
        if not self._counts[key]:
            self._counts.pop(key)
        taken = buffer.pop(0)
        self._taken[key] = taken
        return taken


def wake_key(settings: Settings, model_set: str) -> str:
    """The Redis counter that submissions bump so the dispatcher re-reads its backlog at once."""
    return settings.redis_prefix + keys.DISPATCH_WAKE_KEY.format(model_set=model_set)


def wake_dispatcher(*, redis_client: redis.Redis, settings: Settings, model_set: str) -> bool:
    """Tell the model set's dispatcher that new work is waiting; False when Redis does not answer.

    Best effort: the dispatcher rescans SQL every IPAB_DISPATCH_RESCAN_S anyway.
    """
    try:
        redis_client.incr(wake_key(settings, model_set))
    except redis.RedisError as e:
        log.warning("could not wake the dispatcher of %s (it rescans every few seconds): %s", model_set, e)
        return False
    return True


def run_dispatcher(
    *,
    sessions: sessionmaker[Session],
    redis_client: redis.Redis,
    settings: Settings,
    model_sets: Callable[[], Sequence[str]],
    stop: threading.Event,
) -> None:
    """Dispatch for each model set while holding its lock, until `stop` is set.

    Every worker may run this loop; the per-model-set lock makes one of them work, and a
    holder that dies lets the lock lapse after a few seconds so another takes over.
    """
    me = f"{time.time_ns()}-{threading.get_ident()}"
    ttl_ms = int(max(settings.dispatch_lock_s, 1.0) * 1000)
    dispatchers: dict[str, Dispatcher] = {}
    while not stop.is_set():
        moved = 0
        for name in model_sets():
            moved += _round(
                name, dispatchers, me=me, ttl_ms=ttl_ms, sessions=sessions, redis_client=redis_client, settings=settings
            )
        if moved:
            continue
        # A replica that holds no lock only needs to notice when one lapses: it asks a few times
        # per lock lifetime instead of at every poll (four idle replicas cost Redis and CPU).
        stop.wait(settings.dispatch_poll_s if dispatchers else settings.dispatch_lock_s / STANDBY_CHECKS)
    for name in dispatchers:
        _release(redis_client, settings, name, me)


def _round(
    name: str,
    dispatchers: dict[str, Dispatcher],
    *,
    me: str,
    ttl_ms: int,
    sessions: sessionmaker[Session],
    redis_client: redis.Redis,
    settings: Settings,
) -> int:
    lock_key = settings.redis_prefix + keys.DISPATCH_LOCK_KEY.format(model_set=name)
    try:
        if not hold_lock(redis_client=redis_client, key=lock_key, holder=me, ttl_ms=ttl_ms):
            dispatchers.pop(name, None)  # another holds it: start fresh if we take over later
            return 0
        dispatcher = dispatchers.get(name)
        if dispatcher is None:
            dispatcher = Dispatcher.from_settings(
                sessions=sessions, redis_client=redis_client, settings=settings, model_set=name
            )
            dispatchers[name] = dispatcher
        return dispatcher.dispatch_once()
    except (TransientError, redis.RedisError) as e:
        log.warning("dispatch round for %s skipped: %s", name, e)
        time.sleep(settings.dispatch_poll_s)
    except Exception:
        log.exception("dispatch round for %s failed; trying again", name)
        time.sleep(settings.dispatch_poll_s)
    return 0


def _release(redis_client: redis.Redis, settings: Settings, name: str, me: str) -> None:
    lock_key = settings.redis_prefix + keys.DISPATCH_LOCK_KEY.format(model_set=name)
    with contextlib.suppress(redis.RedisError):
        release_lock(redis_client=redis_client, key=lock_key, holder=me)
