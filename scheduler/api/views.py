"""Reading jobs and batches for a tenant, and the JSON the API shows of them.

Lookups always filter on the caller's tenant, so another tenant's id reads exactly like an
id that does not exist.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import redis
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from scheduler.api.context import ApiContext
from scheduler.api.problems import not_found
from scheduler.commands import STATUSES
from shared import keys
from shared.db import TERMINAL, Batch, Job, JobStatus, utcnow
from shared.dispatch.position import Forecast, forecast_batch, forecast_job
from shared.progress import read_step


def when(value: datetime | None) -> str | None:
    """A stored (naive UTC) time as ISO 8601 with Z."""
    return None if value is None else value.isoformat() + "Z"


def find_job(*, session: Session, tenant: str, job_id: str) -> tuple[Job, Batch]:
    """The tenant's job and its batch; 404 otherwise."""
    row = session.execute(
        select(Job, Batch).join(Batch, Batch.id == Job.batch_id).where(Job.id == job_id, Batch.tenant == tenant)
    ).one_or_none()
    if row is None:
        raise not_found("job", job_id)
    return row[0], row[1]


def find_batch(*, session: Session, tenant: str, batch_id: str) -> Batch:
    """The tenant's batch; 404 otherwise."""
    batch = session.scalar(select(Batch).where(Batch.id == batch_id, Batch.tenant == tenant))
    if batch is None:
        raise not_found("batch", batch_id)
    return batch


def dispatched_now(ctx: ApiContext, model_set: str) -> int:
    """Messages of the model set waiting in Redis (0 when Redis does not answer: positions are forecasts)."""
    try:
        return int(ctx.redis.llen(keys.render_queue(model_set)))
    except redis.RedisError:
        return 0


def job_forecast(ctx: ApiContext, *, job: Job, batch: Batch) -> Forecast | None:
    """Where a queued job stands in the lane policy's order, and when it should start."""
    if job.status != JobStatus.queued.value:
        return None
    return forecast_job(
        sessions=ctx.sessions,
        settings=ctx.settings,
        job_id=job.id,
        dispatched=dispatched_now(ctx, batch.model_set),
        now=utcnow(),
    )


def batch_forecast(ctx: ApiContext, *, batch: Batch) -> Forecast | None:
    """Where the batch's last queued job stands in the lane policy's order."""
    return forecast_batch(
        sessions=ctx.sessions,
        settings=ctx.settings,
        batch_id=batch.id,
        dispatched=dispatched_now(ctx, batch.model_set),
        now=utcnow(),
    )


def _image(ctx: ApiContext, job: Job) -> dict[str, Any]:
    if job.status != JobStatus.succeeded.value or not job.output_key:
        return {"image_url": None, "image_url_expires_s": None}
    expiry_s = ctx.settings.api_image_url_expiry_s
    return {"image_url": ctx.store.presigned_url(job.output_key, expiry_s=expiry_s), "image_url_expires_s": expiry_s}


def job_view(ctx: ApiContext, *, session: Session, job: Job, batch: Batch) -> dict[str, Any]:
    """A job as GET /v1/jobs/{id} shows it."""
    spec = json.loads(job.spec)
    forecast = job_forecast(ctx, job=job, batch=batch)
    error = None if job.error_type is None else {"type": job.error_type, "message": job.error_message}
    return {
        "id": job.id,
        "client_id": job.client_id,
        "batch_id": job.batch_id,
        "status": job.status,
        "queue_position": forecast.position if forecast else None,
        "progress": read_step(ctx.redis, prefix=ctx.settings.redis_prefix, job_id=job.id)
        if job.status == JobStatus.running.value
        else None,
        "eta_s": round(forecast.eta_s, 1) if forecast and forecast.eta_s is not None else None,
        "lane": job.lane,
        "attempts": job.attempts,
        "error": error,
        "params": {**spec["params"], "seed": job.seed},
        "references": [r["sha256"] for r in spec["references"]],
        "output_sha256": job.output_sha256,
        "output_bytes": job.output_bytes,
        "render_batch_size": job.render_batch_size,
        "timings": {
            "queued_at": when(job.queued_at),
            "started_at": when(job.started_at),
            "finished_at": when(job.finished_at),
            "encode_s": job.encode_s,
            "denoise_s": job.denoise_s,
            "upload_s": job.upload_s,
        },
        **_image(ctx, job),
    }


def batch_counts(*, session: Session, batch_ids: list[str]) -> dict[str, dict[str, int]]:
    """Jobs per status (zeros included) of each batch."""
    counts = {batch_id: dict.fromkeys(STATUSES, 0) for batch_id in batch_ids}
    stmt = (
        select(Job.batch_id, Job.status, func.count())
        .where(Job.batch_id.in_(batch_ids))
        .group_by(Job.batch_id, Job.status)
    )
    for batch_id, status, count in session.execute(stmt).tuples():
        counts[batch_id][status] = count
    return counts


def batch_status(counts: dict[str, int]) -> str:
    """in_progress while any job is live; then cancelled if any job was, else completed."""
    if counts[JobStatus.queued.value] or counts[JobStatus.running.value]:
        return "in_progress"
    return "cancelled" if counts[JobStatus.canceled.value] else "completed"


def _eta_s(session: Session, batch: Batch, done: int, remaining: int) -> float | None:
    if not remaining or not done:
        return 0.0 if not remaining else None
    first = session.scalar(select(func.min(Job.started_at)).where(Job.batch_id == batch.id))
    if first is None:
        return None
    elapsed_s = (utcnow() - first).total_seconds()
    return round(elapsed_s / done * remaining, 1)


def batch_view(
    *, session: Session, batch: Batch, counts: dict[str, int], eta: bool = True, forecast: Forecast | None = None
) -> dict[str, Any]:
    """A batch as GET /v1/batches/{id} shows it: counts, progress, ETA (by the lane policy while jobs wait)."""
    total = sum(counts.values())
    done = sum(counts[s.value] for s in TERMINAL)
    eta_s = _eta_s(session, batch, done, total - done) if eta else None
    if forecast is not None and forecast.eta_s is not None:
        eta_s = round(max(eta_s or 0.0, forecast.eta_s), 1)
    return {
        "id": batch.id,
        "status": batch_status(counts),
        "model_set": batch.model_set,
        "created_at": when(batch.created_at),
        "counts": counts,
        "total": total,
        "progress": round(done / total, 4) if total else 1.0,
        "eta_s": eta_s,
        "paused": batch.paused,
        "queue_position": forecast.position if forecast else None,
    }
