"""A job's record, built once from its row; every view of a job is a projection of it.

`job_record` reads the row (and its JSON columns) once; `results_line` is what `ipab results`
prints and, for a tenant (`Audience.TENANT`: no figure of the shared fleet), what
`GET /v1/batches/{id}/results` streams. The API view (`scheduler.api.views`), the
webhook data (`scheduler.batches.events`), the export columns (`scheduler.export.samples`)
and the gallery card (`scheduler.gallery`) take the same record.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Final, Protocol

from sqlalchemy import literal, select, tuple_
from sqlalchemy.orm import Session

from scheduler.batches.counts import TIME_FIELDS
from shared.db import Batch, Job, JobStatus
from shared.keys import object_uri

RECORDS_CHUNK: Final = 1000  # rows fetched at a time when a batch's records are streamed
# Columns a record carries as they are stored.
COLUMNS: Final = (
    *("batch_id", "line", "client_id", "status", "lane", "seed"),
    *("output_key", "output_sha256", "output_bytes", "attempts", "worker_host", "render_batch_size"),
)
TIMESTAMPS: Final = ("queued_at", "started_at", "finished_at")  # shown as ISO 8601 UTC


def iso_utc(value: datetime | None) -> str | None:
    """A stored (naive UTC) time as ISO 8601 with Z; None stays None."""
    return None if value is None else value.isoformat() + "Z"


@dataclass(frozen=True)
class JobRecord:
    """Everything ipab shows of one job, read from its row once."""

    job_id: str
    batch_id: str
    line: int
    client_id: str | None
    status: str
    lane: str
    params: dict[str, Any]  # the spec's parameters (prompt, size, steps...), without the seed
    seed: int
    references: tuple[tuple[str, str], ...]  # (sha256, object key) per reference image
    output_key: str | None
    output_sha256: str | None
    output_bytes: int | None
    attempts: int
    worker_host: str | None
    render_batch_size: int | None  # jobs in the pipeline call that rendered it
    timings: dict[str, Any]  # queued_at, started_at, finished_at (ISO 8601), encode_s, denoise_s, upload_s
    cache_stats: dict[str, Any] | None
    provenance: dict[str, Any] | None  # weight sha256s, model_hash, versions, device, dtype; None before 0006
    error: dict[str, Any] | None  # {"type", "message"} of a failed job
    expires_at: str | None  # when its objects expire (ISO 8601 UTC); None: kept for ever, or not finished
    data_removed_at: str | None  # when the janitor removed its objects; None: they are kept
    metrics: dict[str, Any] = field(default_factory=dict)  # what it used (`usage_metrics`)

    @property
    def prompt(self) -> str:
        """The job's prompt."""
        return str(self.params["prompt"])

    @property
    def data_removed(self) -> bool:
        """Whether its objects are gone (expired or deleted): its output is no longer there."""
        return self.data_removed_at is not None


def usage_metrics(job: Job, *, model_set: str | None, provenance: dict[str, Any] | None) -> dict[str, Any]:
    """What the job used, as the results line, the API (`metrics`, Replicate's name) and webhooks show it.

    `gpu_seconds` is billed: the device time of the attempt that ended it (NULL until it ends);
    `lost_gpu_seconds`, of attempts that did not (killed, taken over, failed), is shown and not
    billed; `pixel_steps` (width x height x steps run) does not depend on the card. `model_set`
    is its batch's (whatever its status: a canceled job is billed too, and the usage reports count
    it under that set); `device`, where a worker recorded one (a succeeded job's provenance).
    """
    return {
        "gpu_seconds": job.gpu_s,
        "lost_gpu_seconds": job.lost_gpu_s or 0.0,
        "queue_seconds": job.queue_s,
        "total_seconds": job.total_s,
        "images": 1 if job.status == JobStatus.succeeded.value else 0,
        "steps": job.steps_run,
        "pixel_steps": job.pixel_steps,
        "model_set": model_set,
        "device": provenance.get("device_name") if provenance else None,
    }


def job_record(job: Job, *, model_set: str | None) -> JobRecord:
    """The record of one job row; `model_set`: its batch's."""
    spec = json.loads(job.spec)
    provenance = json.loads(job.provenance) if job.provenance else None
    timings: dict[str, Any] = {name: iso_utc(getattr(job, name)) for name in TIMESTAMPS}
    timings.update({name: getattr(job, name) for name in TIME_FIELDS})
    return JobRecord(
        job_id=job.id,
        params=spec["params"],
        references=tuple((r["sha256"], r["key"]) for r in spec["references"]),
        timings=timings,
        cache_stats=json.loads(job.cache_stats) if job.cache_stats else None,
        provenance=provenance,
        error=None if job.error_type is None else {"type": job.error_type, "message": job.error_message},
        expires_at=iso_utc(job.expires_at),
        # Being removed reads as removed: its objects may be partly gone already.
        data_removed_at=iso_utc(job.data_removed_at) if job.data_removed_at else _removing(job),
        metrics=usage_metrics(job, model_set=model_set, provenance=provenance),
        **{name: getattr(job, name) for name in COLUMNS},
    )


class Audience(StrEnum):
    """Who a view of a job is for: a tenant sees nothing of the fleet it shares with other tenants."""

    OPERATOR = "operator"  # `ipab results`, `ipab export`: every figure, to run the fleet
    TENANT = "tenant"  # the HTTP API: what is the tenant's own


# Figures of the shared fleet, so of other tenants: the operator's alone. A cache hit (in
# `cache_stats`, and an `encode_s` near 0) says another tenant rendered the same image;
# `worker_host` names the fleet's machines; `render_batch_size` counts the jobs, anybody's,
# rendered in the same pipeline call.
OPERATOR_FIELDS: Final = ("worker_host", "render_batch_size", "cache_stats")
OPERATOR_TIMINGS: Final = ("encode_s",)


def timings_for(record: JobRecord, audience: Audience) -> dict[str, Any]:
    """The record's timings as `audience` sees them: a tenant's without the encode time, and with
    the job's share of its pipeline call as `denoise_s` (the call's time divided by its jobs, as
    `metrics.gpu_seconds` counts it): the whole call's, next to that share, would tell the tenant
    `render_batch_size`, how many jobs (anybody's) shared the call."""
    if audience is Audience.OPERATOR:
        return record.timings
    timings = {name: value for name, value in record.timings.items() if name not in OPERATOR_TIMINGS}
    if timings.get("denoise_s") is not None:
        timings["denoise_s"] = timings["denoise_s"] / (record.render_batch_size or 1)
    return timings


def _removing(job: Job) -> str | None:
    """The expiry of a job whose objects the janitor is removing now, else None."""
    return iso_utc(job.expires_at) if job.data_state is not None else None


class Uris(Protocol):
    """What names objects for a results line: an `ObjectStore`, or `BucketUris` where no S3 client
    is needed (`ipab results` prints names only, and loads no boto3)."""

    def uri(self, key: str) -> str: ...


@dataclass(frozen=True)
class BucketUris:
    """The `s3://` names of one bucket's objects, without a client."""

    bucket: str

    def uri(self, key: str) -> str:
        return object_uri(self.bucket, key)


def output_uri(record: JobRecord, store: Uris) -> str | None:
    """Where the job's output is: None when it has none, or when it was removed (never a broken link)."""
    return store.uri(record.output_key) if record.output_key and not record.data_removed else None


def results_line(record: JobRecord, *, store: Uris, audience: Audience) -> dict[str, Any]:
    """One job as the JSON object `ipab results` prints (OPERATOR) and the API streams (TENANT)."""
    line = {
        "job_id": record.job_id,
        "batch_id": record.batch_id,
        "line": record.line,
        "id": record.client_id,
        "status": record.status,
        "output_uri": output_uri(record, store),
        "output_sha256": record.output_sha256,
        "output_bytes": record.output_bytes,
        **record.params,
        "seed": record.seed,
        "references": [{"sha256": sha, "uri": store.uri(key)} for sha, key in record.references],
        "attempts": record.attempts,
        "worker_host": record.worker_host,
        "render_batch_size": record.render_batch_size,
        "timings": timings_for(record, audience),
        "cache_stats": record.cache_stats,
        "provenance": record.provenance,
        "error": record.error,
        "metrics": record.metrics,
        "expires_at": record.expires_at,
        "data_removed_at": record.data_removed_at,
    }
    return line if audience is Audience.OPERATOR else {k: v for k, v in line.items() if k not in OPERATOR_FIELDS}


def batch_records(
    *,
    session: Session,
    batch_id: str,
    status: str | None = None,
    offset: int = 0,
    limit: int | None = None,
    after: tuple[int, str] | None = None,
) -> Iterator[JobRecord]:
    """The records of a batch's jobs (only those with `status`, when given), in manifest order, streamed;
    a page of them: `offset` and `limit`, or `limit` past `after` (the last record's line and job id)."""
    model_set = session.scalar(select(Batch.model_set).where(Batch.id == batch_id))
    stmt = select(Job).where(Job.batch_id == batch_id).order_by(Job.line, Job.id)
    if offset or limit is not None:
        stmt = stmt.offset(offset).limit(limit)
    if status is not None:
        stmt = stmt.where(Job.status == status)
    if after is not None:
        stmt = stmt.where(tuple_(Job.line, Job.id) > tuple_(literal(after[0]), literal(after[1])))
    for job in session.scalars(stmt.execution_options(yield_per=RECORDS_CHUNK)):
        yield job_record(job, model_set=model_set)
