"""The SQL schema (SQLAlchemy 2.x typed ORM), engines and migrations; SQLite and PostgreSQL.

SQL is the source of truth: a job exists once its row is committed. Every datetime is naive
UTC (`utcnow()`), because SQLite has no time zones and both databases must read alike.
"""

from __future__ import annotations

import fcntl
import logging
import re
import threading
import uuid
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from datetime import UTC, date, datetime
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from sqlalchemy import (
    BigInteger,
    Boolean,
    Date,
    DateTime,
    Engine,
    Float,
    ForeignKey,
    Index,
    Integer,
    MetaData,
    String,
    Text,
    UniqueConstraint,
    create_engine,
    event,
    exc,
    false,
    inspect,
    text,
)
from sqlalchemy.engine import make_url
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column, sessionmaker
from sqlalchemy.schema import CreateIndex
from sqlalchemy.sql.compiler import DDLCompiler
from sqlalchemy.sql.dml import Insert

from shared.errors import DatabaseUnavailable
from shared.job_status import DEFAULT_TENANT as DEFAULT_TENANT
from shared.job_status import TERMINAL as TERMINAL
from shared.job_status import JobStatus as JobStatus
from shared.redact import mask_text, mask_url

MIGRATIONS_DIR: Final = Path(__file__).with_name("migrations")
SQLITE_BUSY_TIMEOUT_MS: Final = 30_000
# Connections a SQLite engine keeps open: one per thread of a threaded server (the API runs
# requests on up to 40 threads). Past the pool, each transaction opened and closed a file
# connection and re-ran the PRAGMAs.
SQLITE_POOL_SIZE: Final = 40
SQLITE_ID_CHUNK: Final = 500  # bound parameters per IN (...) lookup, under SQLite's limit
PG_VALUES_ROWS: Final = 64  # up to this many new jobs go in one INSERT ... VALUES; more through COPY
# A server that accepts and never answers must not hang a command or a worker forever.
SQL_CONNECT_TIMEOUT_S: Final = 5
# Any constant works; it only has to be the same in every process that migrates.
PG_MIGRATION_LOCK_ID: Final = 0x1BAB_0001
# Where a `partial_index` is partial: the dialects that take `<dialect>_where`.
PARTIAL_WHERE: Final = "partial_where"  # the key of its WHERE in `Index.info`
PARTIAL_INDEX_DIALECTS: Final = ("postgresql", "sqlite")


def utcnow() -> datetime:
    """The current time as naive UTC, the only kind of datetime stored."""
    return datetime.now(UTC).replace(tzinfo=None)


def new_id() -> str:
    """A fresh random id (uuid4 text) for batches and jobs."""
    return str(uuid.uuid4())


def partial_index(name: str, *columns: str, where: str) -> Index:
    """An index of the rows matching `where` (SQL) on PostgreSQL and SQLite, a full index elsewhere.

    `where` is kept in the index's `info` and handed to the dialect when the index is created
    (`_create_partial_index`): declared as `postgresql_where=`, it would make SQLAlchemy load its
    whole PostgreSQL dialect when this module is imported, on SQLite too (some 30 ms of every command).
    """
    return Index(name, *columns, info={PARTIAL_WHERE: where})


@compiles(CreateIndex)
def _create_partial_index(create: CreateIndex, compiler: DDLCompiler, **kw: Any) -> str:
    index = create.element
    where = index.info.get(PARTIAL_WHERE)
    if where is not None and compiler.dialect.name in PARTIAL_INDEX_DIALECTS:
        index.dialect_options[compiler.dialect.name]["where"] = text(where)
    create_index: Callable[..., str] = compiler.visit_create_index  # unannotated in SQLAlchemy
    return create_index(create, **kw)


class Base(DeclarativeBase):
    """Declarative base; constraint names are fixed so migrations can refer to them."""

    metadata = MetaData(
        naming_convention={
            "ix": "ix_%(table_name)s_%(column_0_N_name)s",
            "uq": "uq_%(table_name)s_%(column_0_N_name)s",
            "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
            "pk": "pk_%(table_name)s",
        }
    )


class Batch(Base):
    """A named group of jobs submitted together (one manifest, possibly submitted again)."""

    __tablename__ = "batches"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    model_set: Mapped[str] = mapped_column(String(200))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    job_count: Mapped[int] = mapped_column(Integer, default=0)
    tenant: Mapped[str] = mapped_column(String(100), default=DEFAULT_TENANT, server_default=DEFAULT_TENANT, index=True)
    # A paused batch's queued jobs are not dispatched (nor claimed); its running ones finish.
    paused: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # Its deletion was asked for (`ipab delete`, DELETE /v1/batches/{id}): the janitor removes the
    # row once its jobs are gone; a submission into it meanwhile keeps it (clears this).
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Its jobs whose objects the janitor removed. Once it reaches `job_count` (which only
    # submissions raise), nothing of the batch is kept: its references protect nothing.
    removed_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


class ReferenceImage(Base):
    """A reference image stored once in object storage under `refs/<sha256>.<ext>`."""

    __tablename__ = "reference_images"

    sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    key: Mapped[str] = mapped_column(String(512))
    ext: Mapped[str] = mapped_column(String(8))
    width: Mapped[int] = mapped_column(Integer)
    height: Mapped[int] = mapped_column(Integer)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # Set (committed) by the janitor before it deletes the objects of an image no job uses any
    # more; a submission that finds it set checks the objects and clears it (shared/janitor/references.py).
    removing_at: Mapped[datetime | None] = mapped_column(DateTime, index=True)


class Job(Base):
    """One (references, prompt, seed) job: its spec, state, lease, timings, output and error."""

    __tablename__ = "jobs"
    # No separate index on batch_id: both (batch_id, status) and the unique
    # (batch_id, dedupe_key) lead with it, and a third index only slows bulk inserts.
    __table_args__ = (
        UniqueConstraint("batch_id", "dedupe_key"),
        # The dispatcher walks a batch's queued jobs of one lane in FIFO order on this index.
        Index("ix_jobs_batch_id_status_lane_queued_at_line", "batch_id", "status", "lane", "queued_at", "line"),
        Index("ix_jobs_status_lease_expires_at", "status", "lease_expires_at"),
        # What finished lately (a model set's throughput, for every queue forecast): without it,
        # that count read every finished row of the model set. Finished rows only: an insert adds nothing.
        partial_index("ix_jobs_status_finished_at", "status", "finished_at", where="finished_at IS NOT NULL"),
        # The janitor's three scans (expired and kept, being removed, removed and past the metadata's
        # retention), on the rows that expire at all: jobs kept for ever add nothing to it.
        partial_index("ix_jobs_data_state_expires_at", "data_state", "expires_at", where="expires_at IS NOT NULL"),
    )

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    batch_id: Mapped[str] = mapped_column(String(36), ForeignKey("batches.id"))
    line: Mapped[int] = mapped_column(Integer)  # line of the manifest the job came from
    # interactive | scheduled | bulk: which share of the fleet the job waits in (shared/dispatch).
    lane: Mapped[str] = mapped_column(String(16), default="bulk", server_default="bulk")
    client_id: Mapped[str | None] = mapped_column(String(200))
    dedupe_key: Mapped[str] = mapped_column(String(64))
    spec: Mapped[str] = mapped_column(Text)  # JSON of JobSpec.to_json()
    seed: Mapped[int] = mapped_column(BigInteger)
    status: Mapped[str] = mapped_column(String(16), default=JobStatus.queued.value)
    # Each claim increments it; a worker may record a result only while its attempt is
    # still the current one (the fencing token), so a zombie cannot overwrite a newer run.
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    # `attempts` when the job was last re-queued by hand (`ipab retry`): the budget of
    # IPAB_MAX_ATTEMPTS counts from here, while `attempts` itself never goes back (the fence).
    attempt_floor: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    worker_host: Mapped[str | None] = mapped_column(String(255))
    queued_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # The outbox: when the job's message was last pushed to Redis (NULL: not yet).
    enqueued_at: Mapped[datetime | None] = mapped_column(DateTime)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    encode_s: Mapped[float | None] = mapped_column(Float)
    denoise_s: Mapped[float | None] = mapped_column(Float)
    upload_s: Mapped[float | None] = mapped_column(Float)
    cache_stats: Mapped[str | None] = mapped_column(Text)  # JSON
    output_key: Mapped[str | None] = mapped_column(String(512))
    output_sha256: Mapped[str | None] = mapped_column(String(64))
    output_bytes: Mapped[int | None] = mapped_column(BigInteger)
    # How the job ran: the jobs in the pipeline call that rendered it (micro-batching), and the
    # provenance record (weight sha256s, library versions, device, dtype) as JSON.
    render_batch_size: Mapped[int | None] = mapped_column(Integer)
    provenance: Mapped[str | None] = mapped_column(Text)
    error_type: Mapped[str | None] = mapped_column(String(100))
    error_message: Mapped[str | None] = mapped_column(Text)
    # Metering (shared/usage.py). `gpu_s`: the device seconds of the attempt that ended the job
    # (its share of each pipeline call it was in: a call of n jobs splits its time by n), billed;
    # `lost_gpu_s`: those of attempts that did not (killed, taken over, failed), shown, not billed;
    # `attempt_gpu_s`: what the running attempt reported at its last heartbeat, moved to
    # `lost_gpu_s` if that attempt is lost. `steps_run`: the denoising steps of the attempt that
    # ended it; `pixel_steps`: width x height x steps_run, a unit that does not depend on the card.
    # `queue_s`: from submission to the start of that attempt; `total_s`: to the job's end.
    gpu_s: Mapped[float | None] = mapped_column(Float)
    lost_gpu_s: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    attempt_gpu_s: Mapped[float] = mapped_column(Float, default=0.0, server_default="0")
    steps_run: Mapped[int | None] = mapped_column(Integer)
    pixel_steps: Mapped[int | None] = mapped_column(BigInteger)
    queue_s: Mapped[float | None] = mapped_column(Float)
    total_s: Mapped[float | None] = mapped_column(Float)
    # Data lifecycle (shared/retention.py, shared/janitor/): how long its objects are kept once it
    # finishes (NULL: for ever); when they expire (set as it finishes, or by a deletion); what the
    # janitor did with them (`DataState`; NULL: kept) and when; when its deletion was asked for.
    expires_after_s: Mapped[int | None] = mapped_column(BigInteger)
    expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    data_state: Mapped[str | None] = mapped_column(String(16))
    data_removed_at: Mapped[datetime | None] = mapped_column(DateTime)
    deleted_at: Mapped[datetime | None] = mapped_column(DateTime)


class BatchReference(Base):
    """A reference image that jobs of a batch use: what keeps `refs/<sha256>` (shared by content) alive.

    Written with the jobs by every submission whose references are not a tenant's uploads
    (those are kept while their tenant holds them, `tenant_references`). The janitor removes
    a reference only when no tenant holds it and no batch that uses it has a job whose
    objects are kept.
    """

    __tablename__ = "batch_references"

    batch_id: Mapped[str] = mapped_column(String(36), ForeignKey("batches.id"), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), ForeignKey("reference_images.sha256"), primary_key=True, index=True)


class Tenant(Base):
    """A customer of the API: owns keys, references, batches; signs its webhooks with its secret."""

    __tablename__ = "tenants"

    name: Mapped[str] = mapped_column(String(100), primary_key=True)
    # Kept in clear: signing needs it (Standard Webhooks `whsec_<base64>`); shown once at creation.
    webhook_secret: Mapped[str] = mapped_column(String(100))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    # The lanes this tenant may submit to, comma-separated; NULL: every lane.
    lanes: Mapped[str | None] = mapped_column(String(100))
    # The retention of its jobs' objects when a submission names none (0: for ever); NULL: the fleet's.
    expires_after_s: Mapped[int | None] = mapped_column(BigInteger)


class ApiKey(Base):
    """An API key of a tenant; only the sha256 of the key is stored."""

    __tablename__ = "api_keys"

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100), ForeignKey("tenants.name"))
    admin: Mapped[bool] = mapped_column(Boolean, default=False)
    key_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime)


class TenantReference(Base):
    """A reference image (stored once for everybody) that a tenant uploaded, so may use and see."""

    __tablename__ = "tenant_references"

    tenant: Mapped[str] = mapped_column(String(100), primary_key=True)
    sha256: Mapped[str] = mapped_column(String(64), ForeignKey("reference_images.sha256"), primary_key=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class IdempotencyRecord(Base):
    """The first response to a POST with an `Idempotency-Key`; the primary key makes racing duplicates one."""

    __tablename__ = "idempotency_records"

    tenant: Mapped[str] = mapped_column(String(100), primary_key=True)
    key: Mapped[str] = mapped_column(String(255), primary_key=True)
    request_sha256: Mapped[str] = mapped_column(String(64))
    # NULL while the first request is still being handled.
    status_code: Mapped[int | None] = mapped_column(Integer)
    response_body: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow, index=True)


class WebhookSubscription(Base):
    """Where to tell about one job or batch (`kind`), for which events; `notified_at` once its event is out."""

    __tablename__ = "webhook_subscriptions"
    __table_args__ = (Index("ix_webhook_subscriptions_notified_at_kind", "notified_at", "kind"),)

    subject_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    kind: Mapped[str] = mapped_column(String(8))  # job | batch
    tenant: Mapped[str] = mapped_column(String(100))
    url: Mapped[str] = mapped_column(Text)
    events: Mapped[str] = mapped_column(Text)  # JSON list of event types
    notified_at: Mapped[datetime | None] = mapped_column(DateTime)


class WebhookMessage(Base):
    """One webhook delivery (the outbox): its id is the `webhook-id` of every attempt."""

    __tablename__ = "webhook_outbox"
    __table_args__ = (
        UniqueConstraint("subject_id", "event_type"),
        Index("ix_webhook_outbox_delivered_at_next_attempt_at", "delivered_at", "next_attempt_at"),
    )

    id: Mapped[str] = mapped_column(String(40), primary_key=True)
    tenant: Mapped[str] = mapped_column(String(100))
    url: Mapped[str] = mapped_column(Text)
    event_type: Mapped[str] = mapped_column(String(40))
    subject_id: Mapped[str] = mapped_column(String(36))
    payload: Mapped[str] = mapped_column(Text)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    next_attempt_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    delivered_at: Mapped[datetime | None] = mapped_column(DateTime)
    failed_at: Mapped[datetime | None] = mapped_column(DateTime)
    last_error: Mapped[str | None] = mapped_column(Text)


class PlanSlotStatus(StrEnum):
    """What became of one slot of a plan; stored as its value in `plan_slots.status`."""

    submitted = "submitted"  # its batch was made in the transaction that wrote the slot row
    skipped = "skipped"  # not run: the previous batch was still running, or missed (`catch_up`)
    failed = "failed"  # not run: the manifest was missing or invalid at slot time (`reason`)


class Plan(Base):
    """A nightly render plan: a manifest submitted on a cron schedule (`scheduler/plans/`)."""

    __tablename__ = "plans"

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    name: Mapped[str] = mapped_column(String(100), unique=True)
    schedule: Mapped[str] = mapped_column(String(200))  # cron, in the wall-clock time of `timezone`
    timezone: Mapped[str] = mapped_column(String(64))  # IANA name
    manifest: Mapped[str] = mapped_column(Text)  # an absolute path or an s3:// URI
    model_set: Mapped[str] = mapped_column(String(200))
    # The model-set toml the plan file named (absolute): each slot reads its [defaults] and [limits].
    model_set_file: Mapped[str | None] = mapped_column(Text)
    tenant: Mapped[str] = mapped_column(String(100), default=DEFAULT_TENANT)
    lane: Mapped[str] = mapped_column(String(32))  # recorded for the lanes of the dispatcher
    defaults: Mapped[str] = mapped_column(Text)  # JSON of the plan's `set` table
    catch_up: Mapped[str] = mapped_column(String(8))  # latest | all | none
    overlap: Mapped[str] = mapped_column(String(8))  # skip | queue
    webhook_url: Mapped[str | None] = mapped_column(Text)  # told `batch.completed` of each slot's batch
    enabled: Mapped[bool] = mapped_column(Boolean, default=True)
    source: Mapped[str] = mapped_column(Text)  # the plan file last applied
    # Only slots after this instant are due: set at creation, on resume, on a new schedule.
    schedule_from: Mapped[datetime] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class PlanSlot(Base):
    """One slot of a plan (a cron time, or a `plans run --now`): at most one row, so one batch, per slot."""

    __tablename__ = "plan_slots"
    # The unique row is what makes any number of `ipab beat` replicas safe.
    __table_args__ = (UniqueConstraint("plan_id", "slot_at"),)

    id: Mapped[str] = mapped_column(String(36), primary_key=True, default=new_id)
    plan_id: Mapped[str] = mapped_column(String(36), ForeignKey("plans.id"))
    slot_at: Mapped[datetime] = mapped_column(DateTime)  # naive UTC
    kind: Mapped[str] = mapped_column(String(16))  # scheduled | manual
    status: Mapped[str] = mapped_column(String(16))  # PlanSlotStatus
    batch_id: Mapped[str | None] = mapped_column(String(36), ForeignKey("batches.id"))
    reason: Mapped[str | None] = mapped_column(Text)  # why skipped or failed; a catch-up note
    decided_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    decided_by: Mapped[str] = mapped_column(String(255))  # host:pid of the beat or command


class UsageRollup(Base):
    """Usage summed per tenant, UTC day, batch and lane: what usage reports and quotas read.

    Kept by the transactions that end jobs (the worker's fenced finish, a failure, a cancel;
    `shared/usage.py`), so a report reads a row per batch, lane and day however many jobs it
    sums. No foreign key to `batches`: usage outlives a deleted batch.
    """

    __tablename__ = "usage_rollup"
    __table_args__ = (Index("ix_usage_rollup_day", "day"),)

    tenant: Mapped[str] = mapped_column(String(100), primary_key=True)
    day: Mapped[date] = mapped_column(Date, primary_key=True)  # UTC day the jobs ended
    batch_id: Mapped[str] = mapped_column(String(36), primary_key=True)
    lane: Mapped[str] = mapped_column(String(16), primary_key=True)
    model_set: Mapped[str] = mapped_column(String(200))
    jobs: Mapped[int] = mapped_column(BigInteger, default=0)  # jobs that ended: succeeded, failed or canceled
    images: Mapped[int] = mapped_column(BigInteger, default=0)  # jobs that succeeded
    gpu_s: Mapped[float] = mapped_column(Float, default=0.0)  # billed
    lost_gpu_s: Mapped[float] = mapped_column(Float, default=0.0)  # shown, not billed
    pixel_steps: Mapped[int] = mapped_column(BigInteger, default=0)
    queue_s: Mapped[float] = mapped_column(Float, default=0.0)  # summed over the succeeded jobs
    total_s: Mapped[float] = mapped_column(Float, default=0.0)  # summed over the succeeded jobs


class TenantQuota(Base):
    """A tenant's limits (`ipab quotas set`, PUT /v1/quotas/{tenant}); NULL: no limit of that kind.

    Days and months are UTC. The row is also the tenant's lock: a submission that checks a
    quota holds it until its jobs are written (`scheduler/usage/quotas.py`).
    """

    __tablename__ = "tenant_quotas"

    tenant: Mapped[str] = mapped_column(String(100), primary_key=True)
    images_per_day: Mapped[int | None] = mapped_column(BigInteger)
    images_per_month: Mapped[int | None] = mapped_column(BigInteger)
    gpu_s_per_day: Mapped[float | None] = mapped_column(Float)
    gpu_s_per_month: Mapped[float | None] = mapped_column(Float)
    max_running: Mapped[int | None] = mapped_column(Integer)  # jobs running (or dispatched) at once
    updated_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


class QuotaRefusal(Base):
    """How many submissions a quota refused, per tenant and quota: the operator's metrics read it."""

    __tablename__ = "quota_refusals"

    tenant: Mapped[str] = mapped_column(String(100), primary_key=True)
    quota: Mapped[str] = mapped_column(String(32), primary_key=True)  # a TenantQuota column name
    refusals: Mapped[int] = mapped_column(BigInteger, default=0)
    last_refused_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    # WAL lets readers (status, results) run while a worker writes.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str) -> Engine:
    """An engine for `url`: SQLite in WAL mode with a busy timeout and foreign keys; PostgreSQL recycled half-hourly."""
    if make_url(url).get_backend_name() == "sqlite":
        engine = create_engine(
            url,
            pool_size=SQLITE_POOL_SIZE,
            max_overflow=SQLITE_POOL_SIZE,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        )
        event.listen(engine, "connect", _sqlite_on_connect)
        _SQLITE_WRITERS[engine] = threading.Lock()
        return engine
    # No pre-ping (a SELECT 1 before every transaction, 13% of a worker's wall time): a
    # connection broken by a server restart fails its transaction, the pool is invalidated,
    # and the caller's bounded retry (DatabaseUnavailable is transient) reconnects.
    return create_engine(url, pool_recycle=1800, connect_args={"connect_timeout": SQL_CONNECT_TIMEOUT_S})


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


@contextmanager
def database_errors(url: str) -> Iterator[None]:
    """Turn a database that cannot be reached or opened into `DatabaseUnavailable`, one line, URL masked."""
    try:
        yield
    except (exc.OperationalError, exc.InterfaceError) as e:
        reason = _first_line(e.orig if e.orig is not None else e)
        raise DatabaseUnavailable(
            f"database at IPAB_DATABASE_URL={mask_url(url)} cannot be reached ({mask_text(reason)}); "
            "check that it runs and accepts connections, or fix IPAB_DATABASE_URL"
        ) from e


# One lock per SQLite engine. SQLite lets one writer in at a time and makes the others
# sleep in its busy handler (1 to 100 ms a try, however soon the lock frees); threads of one
# process that take this lock first queue in Python instead and start the moment it frees.
_SQLITE_WRITERS: weakref.WeakKeyDictionary[Engine, threading.Lock] = weakref.WeakKeyDictionary()


def serialized_writes(sessions: sessionmaker[Session]) -> AbstractContextManager[object]:
    """Hold around a write transaction that threads of one process run at once (the API's submissions).

    On SQLite, this process's writers take turns on a lock instead of in SQLite's busy
    handler: 16 threads submitting at once spent half their time there, and had a p99 of 650 ms.
    On PostgreSQL, which takes concurrent writers, it does nothing.
    """
    bind = sessions.kw.get("bind")
    lock = _SQLITE_WRITERS.get(bind) if isinstance(bind, Engine) else None
    return lock if lock is not None else nullcontext()


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    """A session factory bound to `engine`; objects stay readable after commit."""
    return sessionmaker(engine, expire_on_commit=False)


def insert_ignoring_duplicates(model: type[Base], *, dialect: str, unique: Sequence[str]) -> Insert:
    """An INSERT that skips rows clashing on the `unique` columns (ON CONFLICT DO NOTHING).

    Concurrent submissions of the same rows then add each once instead of failing.
    """
    # preserve_rowcount: callers read `rowcount` to learn whether their row went in, and
    # psycopg reports -1 for an INSERT .. ON CONFLICT unless SQLAlchemy is asked to keep it.
    # Each dialect imported here, where it is used: a command on SQLite loads no PostgreSQL code.
    if dialect == "postgresql":
        from sqlalchemy.dialects import postgresql

        stmt: Insert = postgresql.insert(model).on_conflict_do_nothing(index_elements=list(unique))
        return stmt.execution_options(preserve_rowcount=True)
    if dialect == "sqlite":
        from sqlalchemy.dialects import sqlite

        stmt = sqlite.insert(model).on_conflict_do_nothing(index_elements=list(unique))
        return stmt.execution_options(preserve_rowcount=True)
    raise ValueError(f"database dialect {dialect!r} is not supported; use SQLite or PostgreSQL")


# The columns `insert_new_jobs` writes, in the order of its row tuples.
NEW_JOB_COLUMNS: Final = ("id", "line", "client_id", "dedupe_key", "spec", "seed", "lane")
# `enqueued_at` stays NULL: a new job waits for the dispatcher (shared/dispatch) to admit it.
_INSERTED_COLUMNS: Final = (*NEW_JOB_COLUMNS, "batch_id", "status", "attempts", "queued_at", "expires_after_s")
# SQLite page cache during a bulk insert: the jobs indexes are keyed by random ids, and
# with the default 2 MiB cache a 100k-row insert spends most of its time re-reading pages.
SQLITE_BULK_CACHE_KIB: Final = 131_072


def insert_new_jobs(
    session: Session,
    *,
    batch_id: str,
    queued_at: datetime,
    rows: Sequence[tuple[Any, ...]],
    expires_after_s: int | None = None,
) -> set[str]:
    """Insert queued jobs (tuples in NEW_JOB_COLUMNS order) in the session's transaction.

    Every row gets `expires_after_s`, the retention of its objects (None: for ever).

    Rows whose (batch_id, dedupe_key) already exists, inserted by a concurrent submission,
    are skipped. Returns the ids actually inserted. The rows go through the DBAPI cursor
    in one statement per database (executemany on SQLite, COPY on PostgreSQL): building
    SQL text per row cost more than the database's own work.
    """
    if not rows:
        return set()
    dialect = session.get_bind().dialect
    driver = session.connection().connection.driver_connection
    fixed = (batch_id, JobStatus.queued.value, 0, queued_at, expires_after_s)
    if dialect.name == "sqlite":
        stamp = DateTime().bind_processor(dialect)
        fixed = (*fixed[:3], stamp(queued_at) if stamp else queued_at, expires_after_s)
        return _insert_sqlite(driver, [(*row, *fixed) for row in rows])
    if dialect.name == "postgresql":
        return _insert_postgres(driver, rows, fixed=fixed)
    raise ValueError(f"database dialect {dialect.name!r} is not supported; use SQLite or PostgreSQL")


def _insert_sqlite(conn: Any, rows: list[tuple[Any, ...]]) -> set[str]:
    cols = ", ".join(_INSERTED_COLUMNS)
    marks = ", ".join("?" * len(_INSERTED_COLUMNS))
    cursor = conn.cursor()
    try:
        (cache_kib,) = cursor.execute("PRAGMA cache_size").fetchone()
        cursor.execute(f"PRAGMA cache_size=-{SQLITE_BULK_CACHE_KIB}")
        try:
            cursor.executemany(
                f"INSERT INTO jobs ({cols}) VALUES ({marks}) ON CONFLICT (batch_id, dedupe_key) DO NOTHING", rows
            )
            inserted = cursor.rowcount
        finally:
            cursor.execute(f"PRAGMA cache_size={int(cache_kib)}")
        ids = {row[0] for row in rows}
        if inserted == len(rows):
            return ids
        # Some rows clashed with rows already there: ours are the fresh ids found (looked up
        # by id, not by batch: a tenant's API batch holds every job it ever sent).
        found: set[str] = set()
        wanted = sorted(ids)
        for start in range(0, len(wanted), SQLITE_ID_CHUNK):
            chunk = wanted[start : start + SQLITE_ID_CHUNK]
            cursor.execute(f"SELECT id FROM jobs WHERE id IN ({', '.join('?' * len(chunk))})", chunk)
            found.update(job_id for (job_id,) in cursor.fetchall())
        return found
    finally:
        cursor.close()


def _insert_postgres(conn: Any, rows: Sequence[tuple[Any, ...]], *, fixed: tuple[Any, ...]) -> set[str]:
    copied = ", ".join(NEW_JOB_COLUMNS)
    cols = ", ".join(_INSERTED_COLUMNS)
    if len(rows) <= PG_VALUES_ROWS:
        # A few rows (the API's jobs): one INSERT ... VALUES, one round trip, where the temporary
        # table below costs four and writes the catalog.
        values = ", ".join(["(" + ", ".join(["%s"] * len(_INSERTED_COLUMNS)) + ")"] * len(rows))
        params = [value for row in rows for value in (*row, *fixed)]
        with conn.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO jobs ({cols}) VALUES {values} ON CONFLICT (batch_id, dedupe_key) DO NOTHING RETURNING id",
                params,
            )
            return {job_id for (job_id,) in cursor.fetchall()}
    with conn.cursor() as cursor:
        # COPY cannot skip conflicts: copy into a temporary table, then insert from it. The
        # columns equal in every row (batch, status, times) are bound once, not copied per row.
        cursor.execute(f"CREATE TEMP TABLE ipab_new_jobs AS SELECT {copied} FROM jobs WITH NO DATA")
        with cursor.copy(f"COPY ipab_new_jobs ({copied}) FROM STDIN") as copy:
            for row in rows:
                copy.write_row(row)
        marks = ", ".join(["%s"] * len(fixed))
        cursor.execute(
            f"INSERT INTO jobs ({cols}) SELECT {copied}, {marks} FROM ipab_new_jobs"
            " ON CONFLICT (batch_id, dedupe_key) DO NOTHING RETURNING id",
            fixed,
        )
        inserted = {job_id for (job_id,) in cursor.fetchall()}
        cursor.execute("DROP TABLE ipab_new_jobs")
        return inserted


def alembic_config(url: str) -> Any:
    """Alembic's Config built in code (no alembic.ini): our migrations folder and `url`."""
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[None]:
    # Two processes starting at once (a worker and `ipab submit`) must not both create
    # the tables: a file lock beside a SQLite file, an advisory lock on PostgreSQL.
    url = engine.url
    if url.get_backend_name() == "sqlite":
        if not url.database or url.database == ":memory:":
            yield
            return
        with open(f"{url.database}.migrate-lock", "a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
        return
    with engine.connect() as conn:
        conn.execute(text("SELECT pg_advisory_lock(:k)"), {"k": PG_MIGRATION_LOCK_ID})
        try:
            yield
        finally:
            conn.execute(text("SELECT pg_advisory_unlock(:k)"), {"k": PG_MIGRATION_LOCK_ID})
            conn.commit()


def upgrade_database(url: str) -> None:
    """Apply every Alembic migration up to head on the database at `url`."""
    from alembic import command

    engine = make_engine(url)
    try:
        with _migration_lock(engine), engine.begin() as conn:
            cfg = alembic_config(url)
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    finally:
        engine.dispose()


_ensured: set[str] = set()
_ensured_lock = threading.Lock()


def ensure_database(url: str) -> None:
    """Upgrade the database at `url` once per process, on first use (the CLI calls this itself).

    A database already at the head costs one query and no Alembic (whose import and script
    loading were a third of a short command's start-up); any other is upgraded by Alembic.
    """
    with _ensured_lock:
        if url in _ensured:
            return
        # Alembic logs each step at INFO; on every command's first use that is noise.
        logging.getLogger("alembic").setLevel(logging.WARNING)
        with database_errors(url):
            if not _at_head(url):
                upgrade_database(url)
        _ensured.add(url)


# `revision: str = "0007"` and `down_revision: str | None = "0006"` as every migration file writes them.
_REVISION_LINE: Final = re.compile(r"""^(revision|down_revision)\b[^=\n]*=\s*(None|"[^"\n]*"|'[^'\n]*')\s*$""", re.M)


def migration_heads() -> frozenset[str] | None:
    """The head revisions of the migrations folder, read from the files without Alembic.

    None when a file does not state its revision and its one parent plainly (a merge, say):
    then only Alembic can tell, and `ensure_database` lets it.
    """
    revisions, parents = set(), set()
    for path in sorted((MIGRATIONS_DIR / "versions").glob("*.py")):
        if path.name == "__init__.py":
            continue
        found: dict[str, list[str]] = {"revision": [], "down_revision": []}
        for name, value in _REVISION_LINE.findall(path.read_text(encoding="utf-8")):
            found[name].append(value)
        if len(found["revision"]) != 1 or len(found["down_revision"]) != 1 or found["revision"][0] == "None":
            return None
        revisions.add(found["revision"][0][1:-1])
        if found["down_revision"][0] != "None":
            parents.add(found["down_revision"][0][1:-1])
    return frozenset(revisions - parents) or None


def _at_head(url: str) -> bool:
    """Whether the database's Alembic version is the migrations' head (False for a fresh database)."""
    heads = migration_heads()
    if heads is None:
        return False
    engine = make_engine(url)
    try:
        with engine.connect() as conn:
            if not inspect(conn).has_table("alembic_version"):
                return False
            return set(conn.execute(text("SELECT version_num FROM alembic_version")).scalars()) == heads
    finally:
        engine.dispose()
