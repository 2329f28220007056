"""API rows into jobs, through the manifest's validator (`parse_rows`) and submit path (`submit_rows`).

An API row is a manifest row whose references are ids (`references`: the sha256s that
POST /v1/references returned, of this tenant) instead of paths. Single API jobs join one
batch per tenant, `api-<tenant>`; a POST /v1/batches makes a batch of its own.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from scheduler.api.context import ApiContext
from scheduler.api.problems import ApiProblem, field_error
from scheduler.submission.manifest import (
    EXPIRES_FIELD,
    ID_FIELD,
    LANE_FIELD,
    REFERENCE_FIELD,
    ParsedManifest,
    Problem,
    parse_rows,
)
from scheduler.submission.references import ReferenceFile, ReferenceResolver
from scheduler.submission.submit import AfterInsert, SubmitResult, submit_rows
from shared.db import Batch, Job, JobStatus, ReferenceImage, TenantReference
from shared.dispatch.policy import DEFAULT_LANE
from shared.jobs import transaction
from shared.spec import PARAM_FIELDS

REFERENCES_FIELD: Final = "references"
WEBHOOK_FIELD: Final = "webhook"
ROW_FIELDS: Final = (REFERENCES_FIELD, *PARAM_FIELDS, LANE_FIELD, EXPIRES_FIELD, ID_FIELD)
REFERENCE_ID: Final = re.compile(r"[0-9a-f]{64}")
RETRY_AFTER_FULL_S: Final = 30


def api_batch_name(tenant: str) -> str:
    """The batch of a tenant's single API jobs."""
    return f"api-{tenant}"


def to_manifest_row(line: int, raw: Mapping[str, Any]) -> Mapping[str, Any] | Problem:
    """An API row as the manifest validator reads it (`references` -> `reference`), or why not."""
    for name in raw:
        if name not in ROW_FIELDS:
            hint = "; reference images go in `references` as ids" if name == REFERENCE_FIELD else ""
            return Problem(line, name, f"unknown field{hint}; allowed: {', '.join(ROW_FIELDS)}")
    row = {k: v for k, v in raw.items() if k != REFERENCES_FIELD}
    if REFERENCES_FIELD in raw:
        refs = raw[REFERENCES_FIELD]
        if not isinstance(refs, list) or not refs:
            return Problem(line, REFERENCES_FIELD, "must be a non-empty list of reference ids")
        row[REFERENCE_FIELD] = refs
    return row


def problems_of(problems: Sequence[tuple[int, str, str]], *, with_lines: bool) -> ApiProblem:
    """422 listing every bad field (`line N: field: reason` for batches)."""
    named = [(line, api_field(field), reason) for line, field, reason in problems]
    errors = [{**field_error(field, None, reason), "line": line} for line, field, reason in named]
    texts = [f"{'line ' + str(line) + ': ' if with_lines else ''}{field}: {reason}" for line, field, reason in named]
    return ApiProblem(422, "; ".join(texts[:20]), errors=errors, kind="invalid-rows")


def api_field(name: str) -> str:
    """A field as the API names it (the manifest's `reference` is the API's `references`)."""
    return REFERENCES_FIELD if name == REFERENCE_FIELD else name


def _renamed(problem: Problem) -> Problem:
    return problem._replace(field=api_field(problem.field))


def parse_api_rows(raw_rows: Iterable[tuple[int, Mapping[str, Any] | Problem]]) -> ParsedManifest:
    """Validate API rows with the manifest's validator; problems name `references`, not `reference`."""
    converted = [(line, row if isinstance(row, Problem) else to_manifest_row(line, row)) for line, row in raw_rows]
    parsed = parse_rows(converted, source="the request")
    return ParsedManifest(parsed.rows, [_renamed(p) for p in parsed.problems], parsed.unchecked_references)


class StoredReferenceResolver(ReferenceResolver):
    """Resolves reference ids among the images a tenant uploaded; never touches the server's disk."""

    def __init__(self, *, ctx: ApiContext, known: Mapping[str, ReferenceFile]) -> None:
        super().__init__(store=ctx.store, roots=[], base_dir=Path("."))
        self.known = dict(known)
        self.recorded.update(self.known)  # each was recorded (after it was stored) by POST /v1/references

    def _resolve_new(self, raw: str) -> ReferenceFile | str:
        if not REFERENCE_ID.fullmatch(raw):
            return "is not a reference id: the 64 hex digits that POST /v1/references returns"
        found = self.known.get(raw)
        if found is None:
            return "no reference has this id; upload the image with POST /v1/references"
        self.files.setdefault(found.sha256, found)
        return found


def tenant_references(*, session: Session, tenant: str, ids: Iterable[str]) -> dict[str, ReferenceImage]:
    """The tenant's reference images among `ids`."""
    wanted = sorted({i for i in ids if REFERENCE_ID.fullmatch(i)})
    found: dict[str, ReferenceImage] = {}
    for start in range(0, len(wanted), 1000):
        stmt = (
            select(ReferenceImage)
            .join(TenantReference, TenantReference.sha256 == ReferenceImage.sha256)
            .where(TenantReference.tenant == tenant, ReferenceImage.sha256.in_(wanted[start : start + 1000]))
        )
        found.update((image.sha256, image) for image in session.scalars(stmt))
    return found


def reference_file(ctx: ApiContext, image: ReferenceImage) -> ReferenceFile:
    """A stored reference image as the submit path takes it."""
    return ReferenceFile(image.sha256, image.ext, image.width, image.height, image.size_bytes, ctx.store.uri(image.key))


def _known_references(ctx: ApiContext, tenant: str, ids: Iterable[str]) -> dict[str, ReferenceFile]:
    """The tenant's references among `ids`: from the cache, then one query for the rest."""
    known: dict[str, ReferenceFile] = {}
    missing: set[str] = set()
    for ref_id in {i for i in ids if REFERENCE_ID.fullmatch(i)}:
        cached = ctx.references.get((tenant, ref_id))
        if cached is None:
            missing.add(ref_id)
        else:
            known[ref_id] = cached
    if missing:
        with transaction(ctx.sessions) as session:
            images = tenant_references(session=session, tenant=tenant, ids=missing)
        for ref_id, image in images.items():
            known[ref_id] = reference_file(ctx, image)
            ctx.references.put((tenant, ref_id), known[ref_id])
    return known


def queued_jobs(*, session: Session, tenant: str) -> int:
    """How many of the tenant's jobs are queued."""
    stmt = (
        select(func.count())
        .select_from(Job)
        .join(Batch, Batch.id == Job.batch_id)
        .where(Batch.tenant == tenant, Job.status == JobStatus.queued.value)
    )
    return int(session.scalar(stmt) or 0)


def check_capacity(ctx: ApiContext, tenant: str, adding: int) -> None:
    """429 when `adding` jobs would pass the tenant's cap; below it, a recent count serves."""
    cap = ctx.settings.api_max_queued_jobs
    queued = ctx.queued_counts.get(tenant)
    if queued is None or queued + adding > cap:  # a refusal is always from a fresh count
        with transaction(ctx.sessions) as session:
            queued = queued_jobs(session=session, tenant=tenant)
        ctx.queued_counts.put(tenant, queued)
    if queued + adding > cap:
        detail = f"tenant {tenant!r} has {queued} queued job(s); adding {adding} would pass the cap of {cap}"
        raise ApiProblem(429, detail, headers={"Retry-After": str(RETRY_AFTER_FULL_S)}, kind="queue-full")


def submit_api_rows(
    ctx: ApiContext,
    *,
    tenant: str,
    parsed: ParsedManifest,
    batch_name: str,
    skip_invalid: bool,
    after_insert: AfterInsert | None = None,
    lane: str = DEFAULT_LANE,
    stored_line: int | None = None,
    expires_after_s: int | None = None,
) -> SubmitResult:
    """Check the cap, resolve reference ids, and submit through the one submit path (rows without a
    `lane` go in `lane`; `stored_line` and `expires_after_s` as `submit_rows` takes them)."""
    ids = [ref for row in parsed.rows for ref in row.references]
    ids += [ref for refs in parsed.unchecked_references.values() for ref in refs]
    check_capacity(ctx, tenant, len(parsed.rows))
    known = _known_references(ctx, tenant, ids)
    result = submit_rows(
        settings=ctx.settings,
        sessions=ctx.sessions,
        parsed=parsed,
        resolver=StoredReferenceResolver(ctx=ctx, known=known),
        batch_name=batch_name,
        model_set=ctx.model_set(),
        tenant=tenant,
        skip_invalid=skip_invalid,
        after_insert=after_insert,
        redis_client=ctx.redis,
        lane=lane,
        stored_line=stored_line,
        expires_after_s=expires_after_s,
        one_transaction=True,  # the references are stored and known: checking them reads nothing
    )
    ctx.queued_counts.update(tenant, lambda queued: queued + result.added)
    return result
