"""POST /v1/jobs in groups: the requests that arrive while one group is written form the next.

A single job costs the submit path the same reads and writes as a batch of many (find
the tenant's batch, check its keys and lanes, insert, commit, wake the dispatcher): 1.4 ms
alone, 0.23 ms a job in a group of 8. So requests do not each run the submit path: each
waits on a future while one task writes everything pending in one `submit_rows` call per
tenant, in a worker thread. A lone request is written at once (a group of one); under load
the groups grow by themselves, with no timer to wait on. PostgreSQL's group commit is the
same idea one level down.

Each request still gets its own answer: its job id, or the problem of its own row (an
unknown reference, a lane its tenant may not use, a cap reached, a quota passed, an `id`
already taken).
A failure of the whole write (the database down) reaches every request of the group.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import uuid
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Final

from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from scheduler.api.context import ApiContext
from scheduler.api.problems import ApiProblem, cap_problem, field_error, from_invalid_input, quota_problem
from scheduler.api.submission import api_batch_name, problems_of, submit_api_rows
from scheduler.submission.manifest import ManifestRow, ParsedManifest, Problem
from scheduler.submission.submit import RowOptions
from scheduler.webhooks.subscriptions import subscribe
from shared.db import Batch, Job
from shared.dispatch.policy import INTERACTIVE_LANE
from shared.errors import InvalidInput, ManifestInvalid
from shared.jobs import transaction

MAX_GROUP: Final = 256  # jobs written in one transaction at most
STORED_LINE: Final = 1  # a single API job is line 1 of nothing; every one records it


@dataclass(frozen=True)
class JobRequest:
    """One POST /v1/jobs, validated: its tenant, its row (line 1) and its webhook (url, events)."""

    tenant: str
    row: ManifestRow
    webhook: tuple[str, list[str]] | None = None


Outcome = str | BaseException  # the new job's id, or what to raise for the request


class JobGroups:
    """Writes POST /v1/jobs requests in groups; one per app, used from its event loop."""

    def __init__(self, ctx: ApiContext) -> None:
        self.ctx = ctx
        self.pending: list[tuple[JobRequest, asyncio.Future[str]]] = []
        self.writer: asyncio.Task[None] | None = None

    async def submit(self, request: JobRequest) -> str:
        """The id of the job queued for `request`; raises the request's own problem."""
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.pending.append((request, future))
        if self.writer is None:
            self.writer = asyncio.create_task(self._write_pending())
        return await future

    async def _write_pending(self) -> None:
        try:
            while self.pending:
                group, self.pending = self.pending[:MAX_GROUP], self.pending[MAX_GROUP:]
                try:
                    outcomes = await run_in_threadpool(write_group, self.ctx, [request for request, _ in group])
                except Exception as e:  # the whole write failed: every request of the group learns why
                    outcomes = [e] * len(group)
                for (_, future), outcome in zip(group, outcomes, strict=True):
                    if future.done():  # the client went away; its job was written all the same
                        continue
                    if isinstance(outcome, BaseException):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            self.writer = None


def write_group(ctx: ApiContext, requests: Sequence[JobRequest]) -> list[Outcome]:
    """Queue the jobs of `requests`, one submission per tenant; an outcome per request, in order."""
    outcomes: list[Outcome | None] = [None] * len(requests)
    by_tenant: dict[str, list[int]] = defaultdict(list)
    for index, request in enumerate(requests):
        by_tenant[request.tenant].append(index)
    for tenant, indexes in by_tenant.items():
        try:
            _write_tenant(ctx, tenant, {i: requests[i] for i in indexes}, outcomes)
        except InvalidInput as e:  # about the tenant's batch itself: every request of it
            _fill(outcomes, indexes, from_invalid_input(e))
        except Exception as e:  # one tenant's failure (the database down) is not the other tenants'
            _fill(outcomes, indexes, e)
    return [outcome if outcome is not None else RuntimeError("job request not written") for outcome in outcomes]


def _fill(outcomes: list[Outcome | None], indexes: Sequence[int], outcome: Outcome) -> None:
    for i in indexes:
        if outcomes[i] is None:
            outcomes[i] = outcome


def _write_tenant(
    ctx: ApiContext, tenant: str, requests: Mapping[int, JobRequest], outcomes: list[Outcome | None]
) -> None:
    # 1. One submission of every row; a row's line is its place in the group. The tenant's cap
    #    is counted under its lock in the transaction that inserts: the first rows that fit go in.
    lines = {line: index for line, index in enumerate(requests, start=1)}
    rows = [_numbered(requests[index].row, line) for line, index in lines.items()]

    def subscribe_webhooks(session: Session, _batch_id: str, job_ids: Mapping[int, str]) -> None:
        for line, job_id in job_ids.items():
            webhook = requests[lines[line]].webhook
            if webhook is not None:
                subscribe(
                    session=session, subject_id=job_id, kind="job", tenant=tenant, url=webhook[0], events=webhook[1]
                )

    try:
        options = RowOptions(
            tenant=tenant,
            skip_invalid=True,  # one request's bad row is its own 422, not the group's
            after_insert=subscribe_webhooks,
            lane=INTERACTIVE_LANE,  # a single API job is interactive unless its `lane` says otherwise
            stored_line=STORED_LINE,
            admit_partly=True,  # those past the cap or a quota get 429, the others go on
        )
        parsed = ParsedManifest(rows, [])
        result = submit_api_rows(ctx, parsed=parsed, batch_name=api_batch_name(tenant), options=options)
        problems, created, over_cap, over_quota = result.invalid, result.job_ids, result.over_cap, result.over_quota
    except ManifestInvalid as e:  # every row was refused
        problems, created, over_cap, over_quota = [Problem(*p) for p in e.problems], {}, None, None
    # 2. Each request's answer: its problems, its job, the cap, a quota, or the job that already has its `id`.
    by_line: dict[int, list[Problem]] = defaultdict(list)
    for problem in problems:
        by_line[problem.line].append(problem)
    refused = set(over_cap.lines) if over_cap is not None else set()
    over = set(over_quota.lines) if over_quota is not None else set()
    for line, index in lines.items():
        if by_line[line]:
            outcomes[index] = problems_of([p._replace(line=STORED_LINE) for p in by_line[line]], with_lines=False)
        elif line in created:
            outcomes[index] = created[line]
        elif over_cap is not None and line in refused:
            outcomes[index] = cap_problem(over_cap)
        elif over_quota is not None and line in over:
            outcomes[index] = quota_problem(over_quota)
        else:
            outcomes[index] = duplicate_id(ctx, tenant, requests[index].row.client_id)


def _numbered(row: ManifestRow, line: int) -> ManifestRow:
    """`row` as line `line` of the group. Without an `id`, every POST is a job of its own: its
    key is unique (the manifest's content key would make a second identical request a duplicate;
    a client re-sends safely with `Idempotency-Key`, or names the job with `id`)."""
    if row.client_id is not None:
        return dataclasses.replace(row, line=line)
    key = hashlib.sha256(f"api-job\0{uuid.uuid4()}".encode()).hexdigest()
    return dataclasses.replace(row, line=line, dedupe_key=key)


def duplicate_id(ctx: ApiContext, tenant: str, client_id: str | None) -> ApiProblem:
    """409: the tenant already has a job with this `id`."""
    with transaction(ctx.sessions) as session:
        existing = session.scalar(
            select(Job.id)
            .join(Batch, Batch.id == Job.batch_id)
            .where(Batch.name == api_batch_name(tenant), Job.client_id == client_id)
        )
    reason = f"is already the id of job {existing}; ids are unique per tenant (GET /v1/jobs/{existing})"
    return ApiProblem(409, f"id: {reason}", errors=[field_error("id", client_id, reason)], kind="duplicate-id")
