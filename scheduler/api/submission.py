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

from sqlalchemy import select
from sqlalchemy.orm import Session

from scheduler.api.context import ApiContext
from scheduler.api.problems import ApiProblem, field_error
from scheduler.batches.limits import queued_jobs_cap, refusal
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
from scheduler.submission.submit import RowOptions, SubmitResult, submit_rows
from shared.db import ReferenceImage, TenantReference
from shared.errors import MAX_LISTED_PROBLEMS
from shared.jobs import transaction
from shared.spec import PARAM_FIELDS

REFERENCES_FIELD: Final = "references"
WEBHOOK_FIELD: Final = "webhook"
ROW_FIELDS: Final = (REFERENCES_FIELD, *PARAM_FIELDS, LANE_FIELD, EXPIRES_FIELD, ID_FIELD)
REFERENCE_ID: Final = re.compile(r"[0-9a-f]{64}")


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


def problems_of(
    problems: Sequence[tuple[int, str, str]],
    *,
    with_lines: bool,
    stopped_after: int | None = None,
    lines_after: int = 0,
) -> ApiProblem:
    """422 listing the bad fields (`line N: field: reason` for batches), at most MAX_LISTED_PROBLEMS.

    Past the cap they are counted, not listed: an answer listing every problem of a large
    body was larger than the body (1 GB for 64 MiB). With `stopped_after`, the body was read
    up to that line only; `lines_after` lines after it were not checked.
    """
    listed = problems[:MAX_LISTED_PROBLEMS]
    named = [(line, api_field(field), reason) for line, field, reason in listed]
    errors = [{**field_error(field, None, reason), "line": line} for line, field, reason in named]
    texts = [f"{'line ' + str(line) + ': ' if with_lines else ''}{field}: {reason}" for line, field, reason in named]
    detail = _summary(problems, len(listed), stopped_after, lines_after) + "; ".join(texts[:20])
    return ApiProblem(422, detail, errors=errors, kind="invalid-rows")


def _summary(problems: Sequence[tuple[int, str, str]], listed: int, stopped_after: int | None, lines_after: int) -> str:
    if stopped_after is not None:
        return (
            f"{len(problems)} problems in lines 1 to {stopped_after}, where reading stopped: the {lines_after} more "
            f"line(s) after it were not checked, and nothing was submitted; the first {listed} problems are listed. "
            "Fix them and send the batch again: "
        )
    if len(problems) > listed:
        rows = len({line for line, _, _ in problems})
        return f"{len(problems)} problems in {rows} rows; the first {listed} problems are listed: "
    return ""


def api_field(name: str) -> str:
    """A field as the API names it (the manifest's `reference` is the API's `references`)."""
    return REFERENCES_FIELD if name == REFERENCE_FIELD else name


def _renamed(problem: Problem) -> Problem:
    return problem._replace(field=api_field(problem.field))


def parse_api_rows(
    raw_rows: Iterable[tuple[int, Mapping[str, Any] | Problem]],
    *,
    max_rows: int | None = None,
    max_problems: int | None = None,
) -> ParsedManifest:
    """Validate API rows with the manifest's validator; problems name `references`, not `reference`.

    Rows are converted as the validator reads them (a generator, not a list), so that its caps
    (`parse_rows`' `max_rows`, `max_problems`) stop the reading of the body too.
    """
    converted = ((line, row if isinstance(row, Problem) else to_manifest_row(line, row)) for line, row in raw_rows)
    parsed = parse_rows(converted, source="the request", max_rows=max_rows, max_problems=max_problems)
    problems = [_renamed(p) for p in parsed.problems]
    return ParsedManifest(parsed.rows, problems, parsed.unchecked_references, parsed.stopped_after)


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


def refuse_when_full(ctx: ApiContext, tenant: str, *, adding: int) -> None:
    """CapReached when the tenant's queued jobs fill its cap already: a batch (of about `adding`
    rows: its lines) is then refused before its body is parsed, which takes seconds for 100k
    rows. A hint, read without the lock: the count that decides is the submit path's."""
    cap = queued_jobs_cap(ctx.settings.api_max_queued_jobs)
    with transaction(ctx.sessions) as session:
        held = cap.count(session, tenant)
    if held >= cap.maximum:
        raise refusal(tenant=tenant, cap=cap, held=held, adding=adding)


def submit_api_rows(ctx: ApiContext, *, parsed: ParsedManifest, batch_name: str, options: RowOptions) -> SubmitResult:
    """Resolve reference ids and submit through the one submit path, within the tenant's queued-jobs
    cap. Past the cap, CapReached, and nothing is written (unless `options.admit_partly`)."""
    tenant = options.tenant
    ids = [ref for row in parsed.rows for ref in row.references]
    ids += [ref for refs in parsed.unchecked_references.values() for ref in refs]
    known = _known_references(ctx, tenant, ids)
    return submit_rows(
        settings=ctx.settings,
        sessions=ctx.sessions,
        parsed=parsed,
        resolver=StoredReferenceResolver(ctx=ctx, known=known),
        batch_name=batch_name,
        model_set=ctx.model_set(),
        options=options,
        redis_client=ctx.redis,
        one_transaction=True,  # the references are stored and known: checking them reads nothing
        cap=queued_jobs_cap(ctx.settings.api_max_queued_jobs),
    )
