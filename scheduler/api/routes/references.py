"""`POST /v1/references` (upload an image once, by content), `GET /v1/references/{id}` and
`DELETE /v1/references/{id}` (the tenant lets go of its upload; the image goes once nothing uses it)."""

from __future__ import annotations

import hashlib
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from sqlalchemy import delete
from starlette.concurrency import run_in_threadpool

from scheduler.api.bodies import read_multipart_file
from scheduler.api.context import ApiContext, CallerDep, Context
from scheduler.api.idempotency import idempotent
from scheduler.api.problems import from_invalid_input, not_found
from scheduler.api.submission import tenant_references
from scheduler.submission.references import CONTENT_TYPES, ReferenceFile, record_references
from shared.db import ReferenceImage, TenantReference, insert_ignoring_duplicates, utcnow
from shared.errors import InvalidInput
from shared.images import MAX_REFERENCE_BYTES, decode_reference, sniff_format
from shared.janitor.loop import wake_janitor
from shared.janitor.references import mark_unused
from shared.jobs import transaction

router = APIRouter(prefix="/v1/references", tags=["references"])
FILE_FIELD = "file"


def reference_view(image: ReferenceImage) -> dict[str, Any]:
    """A stored reference image as the API shows it."""
    return {
        "id": image.sha256,
        "sha256": image.sha256,
        "format": image.ext,
        "width": image.width,
        "height": image.height,
        "size_bytes": image.size_bytes,
    }


def _checked(data: bytes) -> ReferenceFile:
    """The same checks as a manifest's references: format, size, decoded-size bound."""
    try:
        image = decode_reference(data, field=FILE_FIELD)
        ext = sniff_format(data, field=FILE_FIELD)
    except InvalidInput as e:
        raise from_invalid_input(e) from None
    sha = hashlib.sha256(data).hexdigest()
    return ReferenceFile(sha, ext, image.width, image.height, len(data), source="upload")


def _store(ctx: ApiContext, tenant: str, data: bytes) -> dict[str, Any]:
    file = _checked(data)
    if not ctx.store.exists(file.key):  # stored once, however many tenants upload it
        content_type = CONTENT_TYPES.get(file.ext, "application/octet-stream")
        ctx.store.put(file.key, data, metadata={"sha256": file.sha256}, content_type=content_type)
    with transaction(ctx.sessions) as session:
        record_references([file], session=session)
        stmt = insert_ignoring_duplicates(
            TenantReference, dialect=session.get_bind().dialect.name, unique=["tenant", "sha256"]
        )
        session.execute(stmt.values(tenant=tenant, sha256=file.sha256, created_at=utcnow()))
        image = session.get(ReferenceImage, file.sha256)
        assert image is not None
        return reference_view(image)


@router.post("", status_code=201, summary="Upload a reference image (multipart `file`)")
async def create_reference(request: Request, ctx: Context, caller: CallerDep) -> Any:
    """Store the image under `refs/<sha256>.<ext>` once; its id is its sha256."""
    async with ctx.heavy.slot(request, tenant=caller.tenant, route="POST /v1/references"):
        data, _ = await read_multipart_file(request, field=FILE_FIELD, limit_bytes=MAX_REFERENCE_BYTES)

        async def handle() -> JSONResponse:
            return JSONResponse(await run_in_threadpool(_store, ctx, caller.tenant, data), status_code=201)

        return await idempotent(request, ctx, tenant=caller.tenant, content=data, handle=handle)


def _get(ctx: ApiContext, tenant: str, ref_id: str) -> dict[str, Any]:
    with transaction(ctx.sessions) as session:
        found = tenant_references(session=session, tenant=tenant, ids=[ref_id])
        if ref_id not in found:
            raise not_found("reference", ref_id)
        return reference_view(found[ref_id])


@router.get("/{ref_id}", summary="A reference image's metadata")
async def get_reference(ref_id: str, ctx: Context, caller: CallerDep) -> Any:
    """The tenant's reference image `ref_id`; 404 for any other."""
    return await run_in_threadpool(_get, ctx, caller.tenant, ref_id)


def _delete(ctx: ApiContext, tenant: str, ref_id: str) -> dict[str, Any]:
    with transaction(ctx.sessions) as session:
        gone = session.execute(
            delete(TenantReference)
            .where(TenantReference.tenant == tenant, TenantReference.sha256 == ref_id)
            .execution_options(synchronize_session=False)
        )
        if not int(getattr(gone, "rowcount", 0)):
            raise not_found("reference", ref_id)
        mark_unused(session, [ref_id])  # unless another upload or a batch with images kept still uses it
    wake_janitor(redis_client=ctx.redis, prefix=ctx.settings.redis_prefix)
    return {"id": ref_id, "status": "deleting"}


@router.delete("/{ref_id}", status_code=202, summary="Delete a reference image the tenant uploaded")
async def delete_reference(ref_id: str, ctx: Context, caller: CallerDep) -> Any:
    """Forget the tenant's upload at once (404 for it afterwards); the janitor then deletes the image
    and its embeddings, unless one of the tenant's batches whose images are kept still uses it (it goes
    with them), or another tenant uploaded the same image (it stays theirs). 404 for any other id."""
    return await run_in_threadpool(_delete, ctx, caller.tenant, ref_id)
