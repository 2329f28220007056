"""The JSON the API shows of jobs and batches: projections of the batch layer's record and counts.

Routes look jobs and batches up with `scheduler.batches.lookup` within the caller's tenant,
so another tenant's id reads exactly like an id that does not exist.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import redis

from scheduler.api.context import ApiContext
from scheduler.batches.counts import Tally
from scheduler.batches.record import Audience, JobRecord, iso_utc, job_record, timings_for
from shared import keys
from shared.db import Batch, Job, JobStatus, utcnow
from shared.dispatch.position import Forecast, forecast_batch, forecast_job
from shared.step_progress import read_step


def dispatched_now(ctx: ApiContext, model_set: str) -> int:
    """Messages of the model set waiting in Redis (0 when Redis does not answer: positions are forecasts)."""
    try:
        return int(ctx.redis.llen(keys.render_queue(model_set)))
    except redis.RedisError:
        return 0


def _forecast_inputs(ctx: ApiContext, batch: Batch) -> dict[str, Any]:
    return {
        "sessions": ctx.sessions,
        "settings": ctx.settings,
        "dispatched": dispatched_now(ctx, batch.model_set),
        "now": utcnow(),
        "backlog": ctx.backlog.counts,  # a snapshot shared by every forecast, a second or two old at most
    }


def job_forecast(ctx: ApiContext, *, job: Job, batch: Batch) -> Forecast | None:
    """Where a queued job stands in the lane policy's order, and when it should start (up to
    FORECAST_CACHE_S old)."""
    if job.status != JobStatus.queued.value:
        return None
    return _cached(ctx, ("job", job.id), lambda: forecast_job(job_id=job.id, **_forecast_inputs(ctx, batch)))


def batch_forecast(ctx: ApiContext, *, batch: Batch) -> Forecast | None:
    """Where the batch's last queued job stands in the lane policy's order (up to FORECAST_CACHE_S old)."""
    return _cached(ctx, ("batch", batch.id), lambda: forecast_batch(batch_id=batch.id, **_forecast_inputs(ctx, batch)))


def _cached(ctx: ApiContext, key: tuple[str, str], forecast: Callable[[], Forecast | None]) -> Forecast | None:
    found = ctx.forecasts.get(key)
    if found is None:
        found = forecast()
        if found is not None:
            ctx.forecasts.put(key, found)
    return found


def _image(ctx: ApiContext, record: JobRecord) -> dict[str, Any]:
    if record.status != JobStatus.succeeded.value or not record.output_key or record.data_removed:
        return {"image_url": None, "image_url_expires_s": None}
    expiry_s = ctx.settings.api_image_url_expiry_s
    return {"image_url": ctx.store.presigned_url(record.output_key, expiry_s=expiry_s), "image_url_expires_s": expiry_s}


def job_view(ctx: ApiContext, *, job: Job, batch: Batch) -> dict[str, Any]:
    """A job as GET /v1/jobs/{id} shows it: its record, with where it stands and where its image is.

    The tenant's view: no figure of the shared fleet (`scheduler.batches.record.OPERATOR_FIELDS`).
    """
    record = job_record(job, model_set=batch.model_set)
    forecast = job_forecast(ctx, job=job, batch=batch)
    running = record.status == JobStatus.running.value
    return {
        "id": record.job_id,
        "client_id": record.client_id,
        "batch_id": record.batch_id,
        "status": record.status,
        "queue_position": forecast.position if forecast else None,
        "progress": read_step(ctx.redis, prefix=ctx.settings.redis_prefix, job_id=record.job_id) if running else None,
        "eta_s": round(forecast.eta_s, 1) if forecast and forecast.eta_s is not None else None,
        "lane": record.lane,
        "attempts": record.attempts,
        "error": record.error,
        "metrics": record.metrics,
        "params": {**record.params, "seed": record.seed},
        "references": [sha for sha, _ in record.references],
        "output_sha256": record.output_sha256,
        "output_bytes": record.output_bytes,
        "timings": timings_for(record, Audience.TENANT),
        "expires_at": record.expires_at,
        "data_removed_at": record.data_removed_at,
        **_image(ctx, record),
    }


def batch_status(counts: dict[str, int]) -> str:
    """in_progress while any job is live; then cancelled if any job was, else completed."""
    if counts[JobStatus.queued.value] or counts[JobStatus.running.value]:
        return "in_progress"
    return "cancelled" if counts[JobStatus.canceled.value] else "completed"


def _eta_s(tally: Tally, done: int, remaining: int) -> float | None:
    if not remaining or not done:
        return 0.0 if not remaining else None
    first = tally.first_started
    if first is None:
        return None
    elapsed_s = (utcnow() - first).total_seconds()
    return round(elapsed_s / done * remaining, 1)


def batch_view(*, batch: Batch, tally: Tally, eta: bool = True, forecast: Forecast | None = None) -> dict[str, Any]:
    """A batch as GET /v1/batches/{id} shows it: counts, progress, ETA (by the lane policy while jobs wait)."""
    counts, total, done = tally.counts, tally.total, tally.done
    eta_s = _eta_s(tally, done, total - done) if eta else None
    if forecast is not None and forecast.eta_s is not None:
        eta_s = round(max(eta_s or 0.0, forecast.eta_s), 1)
    return {
        "id": batch.id,
        "status": "deleting" if batch.deleted_at is not None else batch_status(counts),
        "model_set": batch.model_set,
        "created_at": iso_utc(batch.created_at),
        "counts": counts,
        "total": total,
        "progress": round(done / total, 4) if total else 1.0,
        "eta_s": eta_s,
        "paused": batch.paused,
        "queue_position": forecast.position if forecast else None,
        "expires_at": iso_utc(tally.expires_at),
    }
