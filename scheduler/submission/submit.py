"""`ipab submit`: a manifest into SQL rows (the truth), in bulk; the dispatcher feeds Redis from them.

Every row is validated before anything is written. New jobs are inserted in one
transaction, each with its lane, waiting for admission (`enqueued_at` NULL). The
dispatcher (`shared/dispatch`) hands them to the workers in policy order: lanes by weight,
tenants fairly, FIFO within a tenant's lane. The submission only bumps the dispatcher's wake
counter, so a job is never stuck behind a Redis outage: SQL holds it, and the dispatcher
rescans SQL every few seconds anyway.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Final

import redis
from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from scheduler.batches.actions import wake
from scheduler.batches.limits import TenantCap, held_under_lock, refusal
from scheduler.submission.defaults import DEFAULT_MAX_ROWS
from scheduler.submission.grid import grid_batch_name, is_grid, parse_grid
from scheduler.submission.manifest import ManifestRow, ParsedManifest, Problem, check_lane, parse_manifest
from scheduler.submission.references import (
    ReferenceFile,
    ReferenceResolver,
    UploadReport,
    resolve_rows,
    upload_references,
)
from scheduler.submission.set_rules import apply_set_rules, rules_from_file, set_rules_for, unchecked_rules_warning
from scheduler.tenants import check_tenant_name, tenant_defaults
from scheduler.terminal_progress import SILENT, Reporter
from scheduler.usage.quotas import admit_within_quotas, check_quotas, record_refusal
from shared.db import (
    DEFAULT_TENANT,
    Batch,
    Job,
    ensure_database,
    insert_ignoring_duplicates,
    insert_new_jobs,
    make_engine,
    make_session_factory,
    new_id,
    serialized_writes,
    utcnow,
)
from shared.dispatch.policy import DEFAULT_LANE
from shared.errors import MAX_LISTED_PROBLEMS, CapReached, InvalidInput, ManifestInvalid, QuotaExceeded
from shared.janitor.references import link_references
from shared.jobs import transaction
from shared.keys import render_queue
from shared.model_set import read_model_set
from shared.model_set_rules import NO_RULES, SetRules
from shared.redis_conn import connect_redis
from shared.retention import resolve_retention
from shared.settings import Settings
from shared.spec import JobSpec, Reference, check_batch_name
from shared.storage import ObjectStore

log = logging.getLogger(__name__)
KEY_CHUNK: Final = 1000  # dedupe keys per `IN (...)` query


@dataclass(frozen=True)
class SubmitResult:
    """What one submission did; `woken` is False when Redis was down (the dispatcher rescans SQL anyway)."""

    batch_id: str
    batch_name: str
    added: int
    skipped_existing: int
    invalid: list[Problem] = field(default_factory=list)
    woken: bool = True
    lane: str = DEFAULT_LANE
    queue: str = ""
    references_uploaded: int = 0
    references_stored: int = 0
    job_ids: dict[int, str] = field(default_factory=dict)  # row line -> the job inserted for it
    over_cap: CapReached | None = None  # with `admit_partly`: the rows the tenant's cap refused (its `lines`)
    over_quota: QuotaExceeded | None = None  # with `admit_partly`: the rows its quotas refused (its `lines`)
    rules_warning: str | None = None  # the set's [defaults] and [limits] could not be read here (set_rules)

    @property
    def invalid_rows(self) -> int:
        """How many distinct manifest lines were refused."""
        return len({p.line for p in self.invalid})


def resolve_model_set_name(value: str | None, settings: Settings) -> str:
    """The model set's name from `--model-set` (a model-set.toml or a bare name), else IPAB_MODEL_SET."""
    if value is None:
        if settings.model_set is None:
            raise InvalidInput(
                "--model-set", None, "is needed: pass --model-set NAME|model-set.toml or set IPAB_MODEL_SET"
            )
        return read_model_set(settings.model_set).name
    if value.endswith(".toml") or Path(value).is_file():
        return read_model_set(value).name
    return value


def default_batch_name(path: Path) -> str:
    """`<manifest stem>-<8 hex of its content hash>`: the same file submitted again joins its batch."""
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:8]
    return f"{path.stem}-{digest}"


# 2. Which rows are new to the batch.


def _find_batch(session: Session, name: str) -> Batch | None:
    return session.scalars(select(Batch).where(Batch.name == name)).one_or_none()


def _existing_keys(session: Session, batch: Batch | None, keys: Sequence[str]) -> set[str]:
    # Only the keys asked about: an API job joins a batch of many, and reads one key, not all.
    if batch is None:
        return set()
    found: set[str] = set()
    for start in range(0, len(keys), KEY_CHUNK):
        chunk = list(keys[start : start + KEY_CHUNK])
        found.update(session.scalars(select(Job.dedupe_key).where(Job.batch_id == batch.id, Job.dedupe_key.in_(chunk))))
    return found


def _check_model_set(batch: Batch | None, model_set: str) -> None:
    if batch is not None and batch.model_set != model_set:
        allowed = f"batch {batch.name!r} runs on model set {batch.model_set!r}; use that or a new --batch"
        raise InvalidInput("--model-set", model_set, allowed)


def _check_tenant(batch: Batch | None, tenant: str) -> None:
    if batch is not None and batch.tenant != tenant:
        raise InvalidInput("--batch", batch.name, "belongs to another tenant; choose another batch name")


# 5. One transaction: the batch, the reference rows, the new jobs.


def _get_or_create_batch(session: Session, *, name: str, model_set: str, tenant: str) -> Batch:
    # Found first: an API job joins its tenant's batch, which exists but for the first job.
    batch = _find_batch(session, name)
    if batch is None:
        dialect = session.get_bind().dialect.name
        stmt = insert_ignoring_duplicates(Batch, dialect=dialect, unique=["name"])
        values = {"id": new_id(), "name": name, "model_set": model_set, "created_at": utcnow(), "job_count": 0}
        session.execute(stmt.values(**values, tenant=tenant))
        batch = _find_batch(session, name)
    assert batch is not None  # inserted just now or by a concurrent submission
    _check_model_set(batch, model_set)
    _check_tenant(batch, tenant)
    return batch


def _job_rows(
    plan_rows: Sequence[tuple[ManifestRow, tuple[ReferenceFile, ...]]], *, lane: str
) -> list[tuple[Any, ...]]:
    """Rows for `insert_new_jobs` (NEW_JOB_COLUMNS): a fresh id, the line, keys, spec JSON, seed, lane.

    The spec JSON is `JobSpec.to_text()`, made once per row: SQL stores it and the
    message carries the same text (`_enqueue`). In the order of `plan_rows`.
    """
    references: dict[tuple[ReferenceFile, ...], tuple[Reference, ...]] = {}
    rows = []
    for row, files in plan_rows:
        if files not in references:  # 100k rows over a few images
            references[files] = tuple(f.reference() for f in files)
        spec = JobSpec(params=row.params, references=references[files]).to_text()
        rows.append((new_id(), row.line, row.client_id, row.dedupe_key, spec, row.params.seed, row.lane or lane))
    return rows


def _insert_jobs(
    session: Session,
    batch: Batch,
    rows: Sequence[tuple[Any, ...]],
    *,
    line: int | None,
    retentions: Sequence[int | None],
) -> set[str]:
    """Insert the job rows (each with `line` when given, and its retention), skipping those already in
    the batch; the ids inserted. A batch whose deletion was asked for is kept by new jobs."""
    stored = rows if line is None else [(row[0], line, *row[2:]) for row in rows]
    by_retention: dict[int | None, list[tuple[Any, ...]]] = {}
    for row, retention in zip(stored, retentions, strict=True):
        by_retention.setdefault(retention, []).append(row)
    queued_at = utcnow()
    inserted: set[str] = set()
    for retention, group in by_retention.items():
        inserted |= insert_new_jobs(
            session, batch_id=batch.id, queued_at=queued_at, rows=group, expires_after_s=retention
        )
    kept = {"deleted_at": None} if inserted else {}
    session.execute(update(Batch).where(Batch.id == batch.id).values(job_count=Batch.job_count + len(inserted), **kept))
    return inserted


# 6. Wake the dispatcher.


def _wake(*, settings: Settings, model_set: str, pooled: redis.Redis | None = None) -> bool:
    """Tell the model set's dispatcher that jobs wait; False when Redis is down (it rescans SQL anyway).

    `pooled` is the caller's long-lived client (the API's); without one, a client for this call.
    """
    client = pooled if pooled is not None else connect_redis(settings.redis_url)
    try:
        return wake(redis_client=client, settings=settings, model_set=model_set)
    finally:
        if pooled is None:
            client.close()


# Called inside the transaction that inserts the jobs, with (session, batch id, the inserted
# jobs' ids by row line): what must commit with the jobs or not at all (the API's webhook
# subscriptions, a plan's slot row).
AfterInsert = Callable[[Session, str, Mapping[int, str]], None]


@dataclass(frozen=True)
class _Request:
    """One submission, its names resolved."""

    settings: Settings
    batch_name: str
    model_set: str
    tenant: str = DEFAULT_TENANT
    after_insert: AfterInsert | None = None
    progress: Reporter = SILENT  # bars on stderr for `ipab submit`
    lane: str = DEFAULT_LANE  # for rows that do not name one
    rules: SetRules = NO_RULES  # the model set's [defaults] and [limits] (set_rules)
    redis_client: redis.Redis | None = None  # the API's pooled client; None: one per submission
    stored_line: int | None = None  # the line every job records; None: its row's
    expires_after_s: int | None = None  # for rows that name none; None: the tenant's, else the fleet's
    # Plan and write in one transaction: for a resolver that does no I/O (references stored already).
    one_transaction: bool = False
    # Counted under the tenant's lock in the writing transaction; past it, CapReached (all rows),
    # or, with `admit_partly`, the first rows that fit go in and the others are `over_cap`.
    cap: TenantCap | None = None
    admit_partly: bool = False

    def __post_init__(self) -> None:
        check_batch_name(self.batch_name)  # refused before anything is read or written
        check_lane(self.lane, field="--lane")
        check_tenant_name(self.tenant)  # a tenant no key could own would hold batches nobody sees


@dataclass
class _Plan:
    """Valid new rows with their reference files, and every problem found."""

    rows: list[tuple[ManifestRow, tuple[ReferenceFile, ...]]]
    problems: list[Problem]
    skipped_existing: int
    batch: Batch | None = None  # found while planning, in the writing transaction (one_transaction)
    tenant_expires_after_s: int | None = None  # the tenant's default retention, read with its lanes
    over_cap: CapReached | None = None  # the rows the tenant's cap refused (`_Request.admit_partly`)
    over_quota: QuotaExceeded | None = None  # the rows the tenant's quotas refused (`_Request.admit_partly`)


@dataclass
class _NewRows:
    """The rows new to the batch that the tenant may submit, and the lane problems of the others."""

    rows: list[ManifestRow]
    lane_problems: list[Problem]
    batch: Batch | None  # as found by these reads
    tenant_expires_after_s: int | None = None


def _new_rows(request: _Request, session: Session, parsed: ParsedManifest) -> _NewRows:
    # 1. Every row was read and validated (columns, ids, parameters) by the caller.
    # 2. Which rows are new to the batch: one SELECT of its existing keys.
    batch = _find_batch(session, request.batch_name)
    _check_model_set(batch, request.model_set)
    _check_tenant(batch, request.tenant)
    existing = _existing_keys(session, batch, [row.dedupe_key for row in parsed.rows])
    defaults = tenant_defaults(session=session, tenant=request.tenant)
    new_rows = [row for row in parsed.rows if row.dedupe_key not in existing]
    lane_problems = _lane_problems(new_rows, default=request.lane, allowed=defaults.lanes, tenant=request.tenant)
    if lane_problems:
        refused = {p.line for p in lane_problems}
        new_rows = [row for row in new_rows if row.line not in refused]
    return _NewRows(new_rows, lane_problems, batch, defaults.expires_after_s)


def _plan(new: _NewRows, parsed: ParsedManifest, resolver: ReferenceResolver) -> _Plan:
    # 3. Check the references of the new rows (and of invalid rows, to report everything),
    #    reading and decoding each image once.
    to_check = [(row.line, row.references) for row in new.rows] + list(parsed.unchecked_references.items())
    files_by_line, ref_problems = resolve_rows(to_check, resolver=resolver)
    rows = [(row, files_by_line[row.line]) for row in new.rows if row.line in files_by_line]
    problems = sorted(parsed.problems + ref_problems + new.lane_problems, key=lambda p: p.line)
    skipped = len(parsed.rows) - len(new.rows) - len(new.lane_problems)
    return _Plan(rows, problems, skipped, new.batch, new.tenant_expires_after_s)


def _lane_problems(
    rows: Sequence[ManifestRow], *, default: str, allowed: frozenset[str] | None, tenant: str
) -> list[Problem]:
    """Rows whose lane the tenant may not use (`ipab keys create --lanes`)."""
    if allowed is None:
        return []
    shown = ", ".join(sorted(allowed))
    return [
        Problem(row.line, "lane", f"{row.lane or default!r} is not open to tenant {tenant!r}; it may use {shown}")
        for row in rows
        if (row.lane or default) not in allowed
    ]


def _write(
    request: _Request, session: Session, plan: _Plan, resolver: ReferenceResolver
) -> tuple[str, dict[int, str], UploadReport]:
    """Upload the references, then insert the batch and the new jobs, in the session's transaction."""
    # The rows are built before the first write: SQLite's write lock is held from there to the commit.
    rows = _job_rows(plan.rows, lane=request.lane)
    defaults = (request.expires_after_s, plan.tenant_expires_after_s, request.settings.retention_outputs_s)
    retentions = [resolve_retention(row.expires_after_s, *defaults) for row, _ in plan.rows]
    with request.progress.stage("upload references", total=None) as stage:
        report = upload_references((f for _, fs in plan.rows for f in fs), resolver=resolver, session=session)
        stage.update(report.uploaded + report.already_stored)
    batch = plan.batch if request.one_transaction and plan.batch is not None else None
    if batch is None:
        batch = _get_or_create_batch(
            session, name=request.batch_name, model_set=request.model_set, tenant=request.tenant
        )
    # The tenant's cap and quotas: its lock is held from here to the commit, so the count and the insert are one step.
    _within_cap(request, session, plan)  # with `admit_partly`, only the first rows may stay
    _within_quotas(request, session, plan)  # likewise
    rows, retentions = rows[: len(plan.rows)], retentions[: len(plan.rows)]
    with request.progress.stage("insert", total=len(plan.rows)) as stage:
        inserted = _insert_jobs(session, batch, rows, line=request.stored_line, retentions=retentions)
        stage.update(len(plan.rows))
    if inserted:  # what keeps their reference images, a tenant's uploads too (it may delete them)
        shas = {f.sha256 for _, files in plan.rows for f in files}
        link_references(session, batch_id=batch.id, shas=sorted(shas))
    job_ids = {row[1]: row[0] for row in rows if row[0] in inserted}
    if request.after_insert is not None:
        request.after_insert(session, batch.id, job_ids)
    return batch.id, job_ids, report


def _within_quotas(request: _Request, session: Session, plan: _Plan) -> None:
    """Keep the plan's rows within the tenant's quotas (`scheduler.usage.quotas`, under its lock):
    all of them, or QuotaExceeded; with `admit_partly` (each row a request of its own), the first
    that fit, the rest in `plan.over_quota`."""
    if not request.admit_partly:
        check_quotas(session=session, tenant=request.tenant, adding=len(plan.rows))
        return
    lines = [row.line for row, _ in plan.rows]
    fits, plan.over_quota = admit_within_quotas(session=session, tenant=request.tenant, lines=lines)
    plan.rows = plan.rows[:fits]


def _within_cap(request: _Request, session: Session, plan: _Plan) -> None:
    """Keep the plan's rows within the tenant's cap, counted under its lock (`scheduler.batches.limits`):
    all of them, or CapReached; with `admit_partly`, the first that fit, the rest in `plan.over_cap`."""
    cap = request.cap
    if cap is None or not plan.rows:
        return
    held = held_under_lock(session=session, tenant=request.tenant, cap=cap)
    room = max(0, cap.maximum - held)
    if len(plan.rows) <= room:
        return
    if not request.admit_partly:
        raise refusal(tenant=request.tenant, cap=cap, held=held, adding=len(plan.rows))
    refused = tuple(row.line for row, _ in plan.rows[room:])
    plan.over_cap = refusal(tenant=request.tenant, cap=cap, held=held + room, adding=1, lines=refused)
    plan.rows = plan.rows[:room]


def _refuse_invalid(plan: _Plan, *, skip_invalid: bool) -> None:
    # 4. All or nothing, unless told to skip the invalid rows.
    if plan.problems and (not skip_invalid or not (plan.rows or plan.skipped_existing)):
        raise ManifestInvalid(list(plan.problems))


def _submit(
    request: _Request,
    sessions: sessionmaker[Session],
    parsed: ParsedManifest,
    resolver: ReferenceResolver,
    *,
    skip_invalid: bool,
) -> SubmitResult:
    if parsed.stopped_after is not None:  # reading stopped at the problem cap: the rest is unchecked
        raise ManifestInvalid(list(parsed.problems), stopped_after=parsed.stopped_after)
    parsed = apply_set_rules(parsed, request.rules, model_set=request.model_set)
    if request.one_transaction:  # references known already: plan and write in one transaction
        with serialized_writes(sessions), transaction(sessions) as session:
            plan = _plan(_new_rows(request, session, parsed), parsed, resolver)
            _refuse_invalid(plan, skip_invalid=skip_invalid)
            batch_id, inserted, report = _write(request, session, plan, resolver)
    else:
        with request.progress.stage("validate", total=len(parsed.rows) + len(parsed.problems)) as stage:
            with transaction(sessions) as session:
                new = _new_rows(request, session, parsed)
            plan = _plan(new, parsed, resolver)  # no snapshot held while references are read
            stage.update(len(parsed.rows) + len(parsed.problems))
        _refuse_invalid(plan, skip_invalid=skip_invalid)
        # 5. References, batch and jobs, in one transaction.
        with serialized_writes(sessions), transaction(sessions) as session:
            batch_id, inserted, report = _write(request, session, plan, resolver)
    # 6. Wake the dispatcher: it hands the new jobs to the workers in policy order.
    queue = render_queue(request.model_set)
    woken = not inserted or _wake(settings=request.settings, model_set=request.model_set, pooled=request.redis_client)
    return SubmitResult(
        batch_id=batch_id,
        batch_name=request.batch_name,
        added=len(inserted),
        skipped_existing=plan.skipped_existing + len(plan.rows) - len(inserted),
        invalid=list(plan.problems),
        woken=woken,
        lane=request.lane,
        queue=queue,
        references_uploaded=report.uploaded,
        references_stored=report.already_stored,
        job_ids=inserted,
        over_cap=plan.over_cap,
        over_quota=plan.over_quota,
    )


def submit_manifest(
    *,
    settings: Settings,
    path: Path,
    batch_name: str | None = None,
    defaults: Mapping[str, Any] | None = None,
    skip_invalid: bool = False,
    model_set_name: str | None = None,
    tenant: str = DEFAULT_TENANT,
    max_grid_rows: int = DEFAULT_MAX_ROWS,
    progress: Reporter = SILENT,
    lane: str = DEFAULT_LANE,
    expires_after_s: int | None = None,
    store: ObjectStore | None = None,
) -> SubmitResult:
    """Validate a manifest, store its references, insert its new jobs and enqueue them.

    Raises `ManifestInvalid` with every problem (and writes nothing) when a row is invalid,
    unless `skip_invalid`: then the valid rows are submitted and the problems returned.
    Without `batch_name` the batch is named after the manifest and a hash of its content.
    A grid `.toml` (`scheduler.submission.grid`) gives its cells as rows (at most `max_grid_rows`)
    and names the batch after its `batch` key or its file name. Rows that name no
    `expires_after` get `expires_after_s` (None: the tenant's retention, else the fleet's).
    A set this host has no toml of is submitted without its rules, and `rules_warning` says so.
    `store`: the object store the caller already built for these settings (None: one is built).
    """
    model_set = resolve_model_set_name(model_set_name, settings)
    rules = set_rules_for(model_set_name, model_set, settings)
    warning = unchecked_rules_warning(model_set_name, model_set, settings, field="--model-set")
    grid = is_grid(path)
    name = batch_name or (grid_batch_name(path) if grid else default_batch_name(path))
    request = _Request(
        settings, name, model_set, tenant, progress=progress, lane=lane, expires_after_s=expires_after_s, rules=rules
    )
    # 1. Read and validate every row (columns, ids, parameters).
    parsed = (
        parse_grid(path, defaults=defaults, max_rows=max_grid_rows)
        if grid
        # Without --skip-invalid nothing is submitted past a problem: reading stops at the listing's cap.
        else parse_manifest(path, defaults=defaults, max_problems=None if skip_invalid else MAX_LISTED_PROBLEMS)
    )
    if store is None:  # else the caller's, built for these settings (a client costs ~50 ms)
        store = ObjectStore.from_settings(settings)
    resolver = ReferenceResolver(
        store=store, roots=settings.reference_roots, base_dir=path.parent, buckets=settings.reference_buckets
    )
    ensure_database(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        sessions = make_session_factory(engine)
        result = _counted(sessions, lambda: _submit(request, sessions, parsed, resolver, skip_invalid=skip_invalid))
        return replace(result, rules_warning=warning)
    finally:
        engine.dispose()


@dataclass(frozen=True)
class RowOptions:
    """How `submit_rows` treats its rows: whose they are, where rows that name no lane go, and so on."""

    tenant: str = DEFAULT_TENANT
    lane: str = DEFAULT_LANE  # for rows that do not name one
    skip_invalid: bool = False  # submit the valid rows and return the problems (else nothing is written)
    after_insert: AfterInsert | None = None  # runs in the transaction of the jobs
    stored_line: int | None = None  # the line every job records (rows gathered from several requests)
    expires_after_s: int | None = None  # for rows that name none (as `submit_manifest` takes it)
    admit_partly: bool = False  # past `cap`, the first rows that fit go in, the others are `over_cap`


def submit_rows(
    *,
    settings: Settings,
    sessions: sessionmaker[Session],
    parsed: ParsedManifest,
    resolver: ReferenceResolver,
    batch_name: str,
    model_set: str,
    options: RowOptions = RowOptions(),
    redis_client: redis.Redis | None = None,
    one_transaction: bool = False,
    cap: TenantCap | None = None,
    model_set_file: str | None = None,
) -> SubmitResult:
    """Submit rows already read and validated (`scheduler.submission.manifest.parse_rows`): the HTTP API's path.

    The same steps as `submit_manifest` from step 2 on; `resolver` turns each row's
    references into stored images; `options` as RowOptions says. `redis_client`, when given,
    is used (not closed) to wake the dispatcher. With `one_transaction`, for a resolver that
    reads nothing (the API's stored references), the rows are checked and written in one
    transaction: fewer round trips to the database. `cap` is counted under the tenant's lock
    in the transaction that inserts: past it, CapReached and nothing is written (unless
    `options.admit_partly`). The set's rules are IPAB_MODEL_SET's when it is `model_set`, or
    those of `model_set_file` (a plan's set toml: `ModelSetError` when it no longer names the set).
    """
    if model_set_file is None:
        rules = set_rules_for(None, model_set, settings)
    else:
        rules = rules_from_file(model_set_file, name=model_set)
    request = _Request(
        settings,
        batch_name,
        model_set,
        options.tenant,
        options.after_insert,
        lane=options.lane,
        redis_client=redis_client,
        stored_line=options.stored_line,
        one_transaction=one_transaction,
        rules=rules,
        expires_after_s=options.expires_after_s,
        cap=cap,
        admit_partly=options.admit_partly,
    )
    submit = partial(_submit, request, sessions, parsed, resolver, skip_invalid=options.skip_invalid)
    return _counted(sessions, submit)


def _counted(sessions: sessionmaker[Session], submit: Callable[[], SubmitResult]) -> SubmitResult:
    """`submit()`; a quota's refusal is counted (its transaction rolled back) and raised on, and so
    are the rows a quota refused when the others were admitted (`admit_partly`)."""
    try:
        result = submit()
    except QuotaExceeded as e:
        record_refusal(sessions=sessions, refused=e)
        raise
    if result.over_quota is not None:  # some rows of a group, each a request of its own
        record_refusal(sessions=sessions, refused=result.over_quota, count=len(result.over_quota.lines))
    return result
