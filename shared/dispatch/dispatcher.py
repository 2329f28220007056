"""The dispatcher: SQL holds every queued job; Redis holds only the next few, chosen by the policy.

Submission writes rows only (`enqueued_at` NULL: waiting for admission). The dispatcher keeps
each model set's Celery queue shallow (`IPAB_DISPATCH_DEPTH` messages): whenever it holds
fewer, it asks the policy (`shared.dispatch.policy`) which (lane, tenant) starts next, takes
that key's oldest undispatched job (FIFO within a tenant's lane), marks it dispatched in SQL
and pushes its message. A job that reaches a worker is never more than the queue's depth
behind one that arrived later in a higher lane, and an interactive job waits behind no message
of another lane: its message goes in at the end the workers take from (`shared.dispatch.front`).

No loss: the row is marked before the push. If the dispatcher dies between the two, the job is
`queued`, marked and absent from Redis's `queued` set: the reconciler hands it back (clears
`enqueued_at`) and it is dispatched again. A flushed Redis loses only the shallow queue, which
the reconciler hands back the same way. One dispatcher per model set works at a time (a Redis
lock that lapses when its holder dies, as the reconciler's); any worker can take over.

Between rounds a dispatcher sleeps in a blocking Redis call until a submission or a worker
that took a message signals it (`shared.dispatch.wake`), its lock needs renewing, or its
backlog is due for a re-read: it runs beside the render, and must not wake to poll. A queue
that workers drain is topped up once it is down to half its depth (new work tops it up at
once): each round then marks and pushes a few jobs in one statement and one pipeline, not one.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final, cast

import redis
from sqlalchemy import ARRAY, String, Table, any_, bindparam, func, literal, select, tuple_, update
from sqlalchemy.orm import Session, sessionmaker

from shared import keys
from shared.db import Batch, Job, JobStatus, utcnow
from shared.db_clock import server_now
from shared.dispatch.front import FRONT_LANES, QueueFront
from shared.dispatch.holds import starts_left
from shared.dispatch.policy import Policy
from shared.dispatch.wake import level_key, refill_level, refill_room, wait_for_signal, wake_key, want_signal
from shared.dispatch.wake import wake_dispatcher as wake_dispatcher  # its callers import it from here
from shared.errors import TransientError
from shared.jobs import ASYNC_COMMIT, autocommit, dialect_of, row_status, transaction
from shared.queue import enqueue_serialized
from shared.reconcile import hold_lock, release_lock
from shared.settings import Settings
from shared.wire import message_text

log = logging.getLogger(__name__)

FETCH_CHUNK: Final = 256  # undispatched jobs read per (lane, tenant) at a time
MAX_ROUND: Final = 5000  # jobs handed to Redis in one round at most (a deep queue fills over a few)
MARK_CHUNK: Final = 1000  # job ids per UPDATE
STANDBY_CHECKS: Final = 5  # lock checks per IPAB_DISPATCH_LOCK_S by a replica that holds none
RENEWALS: Final = 3  # lock renewals per IPAB_DISPATCH_LOCK_S by an idle holder
# After a failed round (Redis or SQL away) the next comes sooner than the timers', the pause
# doubling from the first to the last.
FAILED_PAUSE_S: Final = (0.05, 2.0)
# A burst of submissions (each bumps the wake counter) re-reads the backlog at most this often.
MIN_RESCAN_S: Final = 0.05
# Takes counted for a queue's take rate (IPAB_DISPATCH_HORIZON_S): those of the last second.
RATE_WINDOW_S: Final = 1.0
MAX_DEPTH: Final = 1000  # a deepened queue holds at most this many messages
Key = tuple[str, str]  # (lane, tenant)
# Built once (a Core UPDATE): a round marks about one job per message a worker took, and
# building the statement cost the dispatcher more than running it.
_JOBS: Final = cast(Table, Job.__table__)


def _mark(ids: Any) -> Any:
    """UPDATE jobs SET enqueued_at = now() WHERE id matches `ids` and the job still waits, RETURNING id."""
    return (
        update(_JOBS)
        .where(ids, row_status() == JobStatus.queued.value, _JOBS.c.enqueued_at.is_(None))
        .values(enqueued_at=server_now())
        .returning(_JOBS.c.id)
    )


# SQLite: the ids an expanding IN list.
_MARK: Final = _mark(_JOBS.c.id.in_(bindparam("p_ids", expanding=True)))
# PostgreSQL: the ids one array parameter (`id = ANY(:p_ids)`), so the statement's text is the same
# for every round, whatever its count: the driver prepares it once. An IN list of n ids was a new
# text for each n, which the dispatcher rendered and the server parsed again in every round. Its
# commit does not wait for the WAL flush (see `mark_dispatched`).
_MARK_ASYNC: Final = _mark(_JOBS.c.id == any_(bindparam("p_ids", type_=ARRAY(String())))).where(
    ASYNC_COMMIT.is_not(None)
)


@dataclass(frozen=True)
class Waiting:
    """A queued job not yet handed to Redis."""

    job_id: str
    batch_id: str
    spec: str
    queued_at: datetime
    line: int
    lane: str


def backlog(*, sessions: sessionmaker[Session], model_set: str) -> dict[Key, list[tuple[str, int]]]:
    """Queued, undispatched jobs of unpaused, undeleted batches: per (lane, tenant), (batch id, count) oldest first.

    The waiting jobs are counted first (found by status), then joined to their batches: joining
    first walked every batch of the model set, the finished ones too, so a dispatch round grew
    with the table's history (bench/table_growth.py).
    """
    waiting = (
        select(Job.batch_id, Job.lane, func.count().label("n"))
        .where(Job.status == JobStatus.queued.value, Job.enqueued_at.is_(None))
        .group_by(Job.batch_id, Job.lane)
        .subquery()
    )
    stmt = (
        select(waiting.c.lane, Batch.tenant, Batch.id, waiting.c.n)
        .join(Batch, Batch.id == waiting.c.batch_id)
        # A deleted batch's jobs never start, also those its deletion has not marked yet.
        .where(Batch.model_set == model_set, Batch.paused.is_(False), Batch.deleted_at.is_(None))
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
    stmt = (
        select(Batch.model_set)
        .join(Job, Job.batch_id == Batch.id)
        .where(Job.status == JobStatus.queued.value, Batch.deleted_at.is_(None))
    )
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
            Waiting(job_id=r[0], batch_id=r[1], spec=r[2], queued_at=r[3], line=r[4], lane=lane)
            for r in session.execute(stmt)
        ]


def mark_dispatched(*, sessions: sessionmaker[Session], job_ids: Sequence[str]) -> set[str]:
    """Stamp `enqueued_at` (server time) on those still queued and undispatched; returns their ids.

    On PostgreSQL each chunk is one statement in autocommit whose commit does not wait for its
    WAL flush (`synchronous_commit` off for its transaction alone): the flush was two thirds of
    the server's CPU for a mark. A crash can lose only marks that no later commit flushed, i.e.
    of jobs not claimed yet: they are dispatched again, and the claim (durable, fenced) lets
    one delivery run them.
    """
    marked: set[str] = set()
    mark = _MARK_ASYNC if dialect_of(sessions) == "postgresql" else _MARK
    with autocommit(sessions) as session:  # each chunk stands alone: a mark without its push is handed back
        for start in range(0, len(job_ids), MARK_CHUNK):
            chunk = list(job_ids[start : start + MARK_CHUNK])
            marked.update(session.execute(mark, {"p_ids": chunk}).scalars())
    return marked


def lock_ttl_s(settings: Settings) -> float:
    """How long a dispatcher's lock, and what lapses with it, lives unless renewed (at least 1 s)."""
    return max(settings.dispatch_lock_s, 1.0)


@dataclass
class TakeRate:
    """How many messages the workers took from a queue in the last RATE_WINDOW_S, per second.

    A round learns the takes since the last one from the queue's length (what it left minus what
    it finds); they are dated at the round. The sum is divided by the whole window, not by the
    time the takes were seen in: a short burst (a test, a fleet starting) raises it by at most the
    burst's size per window, and what a queue can hold bounds what a round can see.
    """

    window_s: float = RATE_WINDOW_S
    _seen: deque[tuple[float, int]] = field(default_factory=deque)
    _sum: int = 0

    def add(self, now_s: float, takes: int) -> None:
        if takes > 0:
            self._seen.append((now_s, takes))
            self._sum += takes
        while self._seen and self._seen[0][0] <= now_s - self.window_s:
            self._sum -= self._seen.popleft()[1]

    def per_s(self) -> float:
        return self._sum / self.window_s


def queue_depth(*, configured: int, horizon_s: float, takes_per_s: float) -> int:
    """Messages to keep in a model set's queue: IPAB_DISPATCH_DEPTH, or what the fleet takes in
    IPAB_DISPATCH_HORIZON_S when that is more (at most MAX_DEPTH).

    A fast fleet (many GPUs, fast model sets) takes a shallow queue's messages faster than rounds of
    two can refill them: each round's SQL statement, Redis pipeline and Python cost nearly as much
    for 2 jobs as for 30. Deepened, a job still waits behind at most the horizon's worth of other
    lanes' messages, in time what a job waits behind IPAB_DISPATCH_DEPTH of them on a slower fleet.
    """
    if horizon_s <= 0:
        return configured
    return max(configured, min(MAX_DEPTH, math.ceil(takes_per_s * horizon_s)))


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
    _rescan_deferred: bool = False  # woken too soon after a re-read: re-read once MIN_RESCAN_S has passed
    _more: bool = False  # the last round left room it may fill at once (a capped round, canceled jobs)
    _full: bool = False  # the last round found the queue full: nothing is due until a worker takes a message
    _front: QueueFront | None = None  # pushes the urgent lanes' messages (made at the first)
    _takes: TakeRate = field(default_factory=TakeRate)
    _left: int | None = None  # the queue's length when the last round ended (None: no round yet)
    _level: tuple[int, float] | None = None  # the signal level last set in Redis, and when (monotonic)

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
        length, wake_stamp = pipe.execute()
        length = int(length)
        depth = self._depth(length)
        self._left = length
        room = depth - length
        more, self._more, self._rescan_deferred = self._more, False, False
        # Not yet drained to its low water, nothing new, nothing left over: the queue waits for
        # workers to take more (a round then moves several messages, sharing its mark and push).
        waits = room < refill_room(depth) and wake_stamp == self._wake_stamp and not more
        self._full = room <= 0 or waits
        if self._full:
            if wake_stamp != self._wake_stamp:  # new work: the next take must wake this dispatcher
                want_signal(redis_client=self.redis_client, prefix=self.settings.redis_prefix, model_set=self.model_set)
            return 0  # a wake is kept in the stamp: the first round with room re-reads SQL
        self._rescan_if_due(wake_stamp)
        chosen = self._choose(min(room, MAX_ROUND))
        if not chosen:
            return 0
        marked = mark_dispatched(sessions=self.sessions, job_ids=[w.job_id for w in chosen])
        sent = [w for w in chosen if w.job_id in marked]
        self._push(sent)
        self._left = length + len(sent)
        self._more = len(chosen) == MAX_ROUND or len(sent) < len(chosen)  # capped, or some canceled meanwhile
        return len(sent)

    def _depth(self, length: int) -> int:
        """This round's depth (`queue_depth`), from the takes since the last round; a deepened
        queue's signal level is left in Redis for the workers' takes."""
        now_s = time.monotonic()
        if self._left is not None:
            self._takes.add(now_s, self._left - length)
        configured = self.settings.dispatch_depth
        depth = queue_depth(
            configured=configured, horizon_s=self.settings.dispatch_horizon_s, takes_per_s=self._takes.per_s()
        )
        level = refill_level(depth)
        last = self._level
        if depth > configured and (last is None or last[0] != level or now_s - last[1] > self._level_ttl_s / RENEWALS):
            key = level_key(self.settings.redis_prefix, self.model_set)
            self.redis_client.set(key, level, px=int(self._level_ttl_s * 1000))
            self._level = (level, now_s)
        elif depth == configured and last is not None:
            self.redis_client.delete(level_key(self.settings.redis_prefix, self.model_set))
            self._level = None
        return depth

    @property
    def _level_ttl_s(self) -> float:
        """A deepened queue's signal level lapses with the dispatcher's lock: a successor starts shallow."""
        return lock_ttl_s(self.settings)

    def _push(self, sent: Sequence[Waiting]) -> None:
        """The messages of `sent` (in policy order): urgent lanes' at the queue's consumer end
        (`shared.dispatch.front`), the others at its far end."""
        urgent: list[tuple[str, str]] = []
        others: list[tuple[str, str]] = []
        for w in sent:
            text = message_text(job_id=w.job_id, batch_id=w.batch_id, spec_json=w.spec)
            (urgent if w.lane in FRONT_LANES else others).append((w.job_id, text))
        if urgent:
            if self._front is None:
                prefix = self.settings.redis_prefix
                self._front = QueueFront(redis_client=self.redis_client, queue=self.queue, prefix=prefix)
            self._front.push(urgent)
        if others:
            enqueue_serialized(
                redis_client=self.redis_client, queue=self.queue, messages=others, prefix=self.settings.redis_prefix
            )

    def _rescan_if_due(self, wake_stamp: bytes | None) -> None:
        """Re-read SQL when woken (at most every MIN_RESCAN_S: a burst of submissions) or when due."""
        since_s = time.monotonic() - self._rescanned_at
        woken = wake_stamp != self._wake_stamp
        if (woken and since_s >= MIN_RESCAN_S) or since_s >= self.settings.dispatch_rescan_s:
            self._wake_stamp = wake_stamp
            self.rescan()
        else:
            self._rescan_deferred = woken

    def idle_s(self) -> float:
        """How long this dispatcher may sleep without a signal: 0 while the queue has room that
        its last round could not fill, then until its deferred or periodic re-read of SQL;
        with the queue full, until a worker takes a message (the loop renews its lock meanwhile).

        A round that filled the queue, or took every job it knew of, needs no second look: the
        next signal (a worker took a message, new work) or timer brings one.
        """
        if self._full:
            return math.inf
        if self._more:
            return 0.0
        due_s = MIN_RESCAN_S if self._rescan_deferred else self.settings.dispatch_rescan_s
        return max(due_s - (time.monotonic() - self._rescanned_at), 0.0)

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
    holder that dies lets the lock lapse after a few seconds so another takes over. The
    holder sleeps between rounds until it is signalled or due (`_Loop.wait`); a replica that
    holds no lock only asks a few times per lock lifetime whether it lapsed.
    """
    loop = _Loop(sessions=sessions, redis_client=redis_client, settings=settings)
    while not stop.is_set():
        loop.run_round(model_sets())
        loop.wait(stop)
    loop.release_all()


@dataclass
class _Loop:
    """One `run_dispatcher` loop: the model sets whose lock it holds, and when to look again."""

    sessions: sessionmaker[Session]
    redis_client: redis.Redis
    settings: Settings
    me: str = field(default_factory=lambda: f"{time.time_ns()}-{threading.get_ident()}")
    dispatchers: dict[str, Dispatcher] = field(default_factory=dict)
    held_at_s: dict[str, float] = field(default_factory=dict)  # monotonic time before each lock's last renewal
    standby: bool = False  # some model set's lock is another's: look again before it may lapse
    failures: int = 0  # rounds failed in a row

    def run_round(self, names: Sequence[str]) -> None:
        """One round over the model sets: each one's lock taken or renewed, its queue topped up."""
        failed = False
        self.standby = False
        for name in names:
            try:
                self._round(name)
            except (TransientError, redis.RedisError) as e:
                log.warning("dispatch round for %s skipped: %s", name, e)
                failed = True
            except Exception:
                log.exception("dispatch round for %s failed; trying again", name)
                failed = True
        self.failures = self.failures + 1 if failed else 0

    def _round(self, name: str) -> None:
        if not self._hold(name):
            self.dispatchers.pop(name, None)  # another holds it: start fresh if we take over later
            self.standby = True
            return
        dispatcher = self.dispatchers.get(name)
        if dispatcher is None:
            dispatcher = Dispatcher.from_settings(
                sessions=self.sessions, redis_client=self.redis_client, settings=self.settings, model_set=name
            )
            self.dispatchers[name] = dispatcher
        dispatcher.dispatch_once()

    def _hold(self, name: str) -> bool:
        """Whether this loop holds the model set's lock: taken or renewed in Redis, unless it was
        renewed less than IPAB_DISPATCH_LOCK_S / RENEWALS ago (it then has at least two thirds of
        its lifetime left, so nobody else can hold it). A busy holder's rounds, about one per job
        taken, thus cost Redis no script each."""
        started_s = time.monotonic()
        if started_s - self.held_at_s.get(name, -math.inf) < self.settings.dispatch_lock_s / RENEWALS:
            return True
        if hold_lock(redis_client=self.redis_client, key=self._lock_key(name), holder=self.me, ttl_ms=self._ttl_ms):
            self.held_at_s[name] = started_s  # counted from before the call: the lock lives at least that long
            return True
        self.held_at_s.pop(name, None)
        return False

    def wait(self, stop: threading.Event) -> None:
        """Sleep until there may be work: a signal, a lock to renew or to look at, a re-read due,
        a failed round to try again."""
        timeout_s = self._timeout_s()
        if timeout_s <= 0:
            return  # a dispatcher has more to do now
        if not self.dispatchers:
            stop.wait(timeout_s)
            return
        try:
            wait_for_signal(
                redis_client=self.redis_client,
                prefix=self.settings.redis_prefix,
                model_sets=list(self.dispatchers),
                timeout_s=timeout_s,
            )
        except redis.RedisError as e:
            log.warning("dispatcher: cannot wait on Redis (%s); looking again in %.1f s", e, timeout_s)
            stop.wait(timeout_s)

    def _timeout_s(self) -> float:
        lock_s = self.settings.dispatch_lock_s
        timeout_s = lock_s / STANDBY_CHECKS if self.standby else lock_s / RENEWALS
        if self.failures:  # soon after a first failure, then less and less often
            first_s, last_s = FAILED_PAUSE_S
            timeout_s = min(timeout_s, first_s * 2 ** min(self.failures - 1, 16), last_s)
        return min([timeout_s, *(d.idle_s() for d in self.dispatchers.values())])

    def release_all(self) -> None:
        """A clean stop hands every lock over at once, not after it lapses."""
        for name in self.dispatchers:
            with contextlib.suppress(redis.RedisError):
                release_lock(redis_client=self.redis_client, key=self._lock_key(name), holder=self.me)

    def _lock_key(self, name: str) -> str:
        return self.settings.redis_prefix + keys.DISPATCH_LOCK_KEY.format(model_set=name)

    @property
    def _ttl_ms(self) -> int:
        return int(lock_ttl_s(self.settings) * 1000)
