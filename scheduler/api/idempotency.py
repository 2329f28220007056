"""`Idempotency-Key` on every POST: the same key and body get the first response, and create nothing.

The claim is an INSERT of the (tenant, key) primary key, so two racing requests with one
key cannot both pass: the loser waits for the winner's response and replays it. A claim
whose owner died (no response after `STALE_CLAIM_S`) is taken over with a conditional
UPDATE. Only 2xx responses are kept; after an error the key is free again, so a client
can retry. Records are deleted after IPAB_IDEMPOTENCY_TTL_S (at least 24 h).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Final

from fastapi import Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

from scheduler.api.context import ApiContext
from scheduler.api.problems import ApiProblem, field_error, invalid
from shared.db import IdempotencyRecord, insert_ignoring_duplicates, utcnow
from shared.jobs import transaction

HEADER: Final = "Idempotency-Key"
KEY_PATTERN: Final = re.compile(r"[\x21-\x7e]{1,255}")
WAIT_S: Final = 10.0  # how long a duplicate waits for the first request's response
POLL_S: Final = 0.05
STALE_CLAIM_S: Final = 120.0  # a claim without a response this old belongs to a dead request
HASH_INLINE_BYTES: Final = 64 * 1024  # larger contents are hashed off the event loop


@dataclass(frozen=True)
class Replay:
    """The stored first response."""

    status_code: int
    body: str


def fingerprint(request: Request, content: bytes | bytearray) -> str:
    """What makes two requests 'the same': method, path, query and the (parsed, canonical) content."""
    digest = hashlib.sha256(f"{request.method} {request.url.path}?{request.url.query}\n".encode())
    digest.update(content)  # not `head + content`: a copy of a body of up to IPAB_API_MAX_BODY_BYTES
    return digest.hexdigest()


async def _fingerprint(request: Request, content: bytes | bytearray) -> str:
    # 64 MiB take the event loop ~0.1 s to hash: a large body is hashed in a thread.
    if len(content) <= HASH_INLINE_BYTES:
        return fingerprint(request, content)
    return await run_in_threadpool(fingerprint, request, content)


def canonical_json(value: object) -> bytes:
    """JSON with sorted keys, so key order and spacing do not make a request 'different'."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8", "replace")


def _claim(ctx: ApiContext, tenant: str, key: str, request_sha256: str) -> bool | Replay | None:
    """True: ours to handle. A Replay: answered before. None: another request is handling it now."""
    now = utcnow()
    with transaction(ctx.sessions) as session:
        stmt = insert_ignoring_duplicates(
            IdempotencyRecord, dialect=session.get_bind().dialect.name, unique=["tenant", "key"]
        )
        values = {"tenant": tenant, "key": key, "request_sha256": request_sha256, "created_at": now}
        if getattr(session.execute(stmt.values(**values)), "rowcount", 0) == 1:
            return True
        row = session.execute(
            select(IdempotencyRecord).where(IdempotencyRecord.tenant == tenant, IdempotencyRecord.key == key)
        ).scalar_one_or_none()
        if row is None:  # expired and deleted between the two statements
            return None
        if row.request_sha256 != request_sha256:
            reason = "was used with another request (different body, path or query); use a new key"
            raise invalid(HEADER, key, reason)
        if row.status_code is not None:
            return Replay(row.status_code, row.response_body or "")
        return _take_over_stale(session, row, now)


def _take_over_stale(session: Session, row: IdempotencyRecord, now: datetime) -> bool | None:
    if row.created_at > now - timedelta(seconds=STALE_CLAIM_S):
        return None

    result = session.execute(
        update(IdempotencyRecord)
        .where(
            IdempotencyRecord.tenant == row.tenant,
            IdempotencyRecord.key == row.key,
            IdempotencyRecord.created_at == row.created_at,
            IdempotencyRecord.status_code.is_(None),
        )
        .values(created_at=now)
    )
    return True if getattr(result, "rowcount", 0) == 1 else None


def _finish(ctx: ApiContext, tenant: str, key: str, response: Response | None) -> None:
    where = (IdempotencyRecord.tenant == tenant, IdempotencyRecord.key == key)
    with transaction(ctx.sessions) as session:
        if response is None or not 200 <= response.status_code < 300:
            session.execute(delete(IdempotencyRecord).where(*where))
            return
        body = bytes(response.body).decode()
        session.execute(
            update(IdempotencyRecord).where(*where).values(status_code=response.status_code, response_body=body)
        )


def delete_expired(*, ctx: ApiContext) -> int:
    """Delete the records older than IPAB_IDEMPOTENCY_TTL_S; returns how many."""
    cutoff = utcnow() - timedelta(seconds=ctx.settings.idempotency_ttl_s)
    with transaction(ctx.sessions) as session:
        result = session.execute(delete(IdempotencyRecord).where(IdempotencyRecord.created_at < cutoff))
        return int(getattr(result, "rowcount", 0) or 0)


def _key_of(request: Request) -> str | None:
    key = request.headers.get(HEADER)
    if key is not None and not KEY_PATTERN.fullmatch(key):
        error = field_error(HEADER, key, "must be 1 to 255 printable ASCII characters without spaces")
        raise ApiProblem(400, f"{HEADER} must be 1 to 255 printable ASCII characters", errors=[error])
    return key


async def _claim_or_wait(ctx: ApiContext, tenant: str, key: str, request_sha256: str) -> bool | Replay:
    deadline = time.monotonic() + WAIT_S
    while True:
        claimed = await run_in_threadpool(_claim, ctx, tenant, key, request_sha256)
        if claimed is not None:
            return claimed
        if time.monotonic() >= deadline:
            detail = f"a request with {HEADER} {key!r} is still being handled; retry shortly"
            raise ApiProblem(409, detail, headers={"Retry-After": "1"}, kind="idempotency-in-progress")
        await asyncio.sleep(POLL_S)


async def idempotent(
    request: Request,
    ctx: ApiContext,
    *,
    tenant: str,
    content: bytes | bytearray,
    handle: Callable[[], Awaitable[JSONResponse]],
) -> Response:
    """Run `handle` once per (tenant, Idempotency-Key); replay its response to repeats of the same request."""
    key = _key_of(request)
    if key is None:
        return await handle()
    claimed = await _claim_or_wait(ctx, tenant, key, await _fingerprint(request, content))
    if isinstance(claimed, Replay):
        headers = {"Idempotent-Replayed": "true"}
        return Response(claimed.body, status_code=claimed.status_code, headers=headers, media_type="application/json")
    response: JSONResponse | None = None
    try:
        response = await handle()
    finally:
        await run_in_threadpool(_finish, ctx, tenant, key, response)
    return response


async def idempotent_action(
    request: Request, ctx: ApiContext, tenant: str, action: Callable[[], dict[str, Any]], *, content: bytes = b""
) -> Response:
    """`idempotent` for an action on a batch or job (cancel, pause, retry...): `action` runs in a
    thread, and its view is the 200 answer, replayed to repeats of the same request (`content`
    tells apart actions that share a path)."""

    async def handle() -> JSONResponse:
        return JSONResponse(await run_in_threadpool(action))

    return await idempotent(request, ctx, tenant=tenant, content=content, handle=handle)
