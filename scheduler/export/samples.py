"""Samples to export: a job's PNG (checked against the sha256 SQL holds) and its metadata columns.

Jobs are read in pages of `PAGE_ROWS` (keyset pagination on the manifest line and job id),
each page in its own short transaction, so an export of a million jobs neither holds a
read transaction open for hours nor keeps every row in memory. PNGs are fetched from
object storage by a few threads at a time.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import select, tuple_
from sqlalchemy.orm import Session, sessionmaker

from scheduler.batches.record import Audience, job_record, results_line
from shared.db import Batch, Job, JobStatus
from shared.errors import IpabError, ObjectMissing
from shared.jobs import transaction
from shared.storage import ObjectStore

# From the job's provenance record (null for jobs rendered before ipab kept one): A1111's short
# model hash, every weight file's sha256 (JSON text, by file), the versions, device and dtype, and
# the model set's LoRAs (JSON text: [{name, sha256, scale}], in fusing order; [] for a set without).
PROVENANCE_COLUMNS: Final = (
    "model_hash",
    "weights_sha256",
    "ipab_version",
    "diffusers_version",
    "transformers_version",
    "torch_version",
    "device",
    "dtype",
    "loras",
)
PAGE_ROWS: Final = 256
FETCH_THREADS: Final = 8
# The columns every format carries, in this order; `text` (imagefolder) and `image` are added by the writers.
COLUMNS: Final = (
    "job_id",
    "id",
    "batch_id",
    "line",
    "prompt",
    "negative_prompt",
    "seed",
    "width",
    "height",
    "steps",
    "guidance_scale",
    "ip_adapter_scale",
    "ip_adapter_scale_spec",
    "scheduler",
    "reference_sha256",
    "reference_uri",
    "output_sha256",
    "output_bytes",
    "output_uri",
    "model_set",
    *PROVENANCE_COLUMNS,
    "finished_at",
    "expires_at",  # when the image expires in the object store (null: kept for ever); the export's copy stays
)


class OutputMismatch(IpabError):
    """Raised when an output's bytes do not have the sha256 that SQL recorded for them."""


@dataclass(frozen=True)
class Sample:
    """One exported job: its PNG bytes and its metadata columns (`COLUMNS`)."""

    job_id: str
    png: bytes
    columns: dict[str, Any]

    @property
    def prompt(self) -> str:
        """The prompt (the `text` of an image-text dataset)."""
        return str(self.columns["prompt"])


def export_columns(record: dict[str, Any], *, model_set: str) -> dict[str, Any]:
    """The metadata columns of one `ipab results` record, flat and of one type per column.

    `ip_adapter_scale` is a number or null (a preset or per-block scales give null), and
    `ip_adapter_scale_spec` is the value exactly as given, as JSON text.
    """
    scale = record["ip_adapter_scale"]
    number = float(scale) if isinstance(scale, int | float) and not isinstance(scale, bool) else None
    flat = {
        **record,
        "ip_adapter_scale": number,
        "ip_adapter_scale_spec": json.dumps(scale, sort_keys=True),
        "reference_sha256": [r["sha256"] for r in record["references"]],
        "reference_uri": [r["uri"] for r in record["references"]],
        "model_set": model_set,
        **provenance_columns(record.get("provenance")),
        "finished_at": record["timings"]["finished_at"],
        "expires_at": record["expires_at"],
    }
    return {name: flat[name] for name in COLUMNS}


def provenance_columns(provenance: dict[str, Any] | None) -> dict[str, Any]:
    """`PROVENANCE_COLUMNS` from a job's provenance record (all null without one)."""
    if not provenance:
        return dict.fromkeys(PROVENANCE_COLUMNS)
    versions = provenance.get("versions", {})
    files = provenance.get("files")
    return {
        "model_hash": provenance.get("model_hash"),
        "weights_sha256": json.dumps(files, sort_keys=True) if files is not None else None,
        **{f"{name}_version": versions.get(name) for name in ("ipab", "diffusers", "transformers", "torch")},
        "device": provenance.get("device"),
        "dtype": provenance.get("dtype"),
        "loras": json.dumps(provenance.get("loras", []), sort_keys=True),
    }


def count_pending(sessions: sessionmaker[Session], *, batch_id: str, exported: set[str]) -> int:
    """How many succeeded jobs of the batch whose image is kept are not in the export yet."""
    kept = (Job.batch_id == batch_id, Job.status == JobStatus.succeeded.value, Job.data_state.is_(None))
    with transaction(sessions) as session:
        ids = session.scalars(select(Job.id).where(*kept))
        return sum(1 for job_id in ids if job_id not in exported)


def _pages(sessions: sessionmaker[Session], batch_id: str, status: str, store: ObjectStore) -> Iterator[list[Any]]:
    after: tuple[int, str] | None = None
    while True:
        stmt = select(Job).where(Job.batch_id == batch_id, Job.status == status)
        if after is not None:
            stmt = stmt.where(tuple_(Job.line, Job.id) > after)
        with transaction(sessions) as session:
            model_set = session.scalar(select(Batch.model_set).where(Batch.id == batch_id))
            jobs = session.scalars(stmt.order_by(Job.line, Job.id).limit(PAGE_ROWS)).all()
            records = [job_record(job, model_set=model_set) for job in jobs]
            lines = [results_line(record, store=store, audience=Audience.OPERATOR) for record in records]
            page = [(job.output_key, line) for job, line in zip(jobs, lines, strict=True)]
        if not page:
            return
        yield page
        after = (page[-1][1]["line"], page[-1][1]["job_id"])


def failed_records(sessions: sessionmaker[Session], *, batch_id: str, store: ObjectStore) -> Iterator[dict[str, Any]]:
    """Every failed job of the batch as its `ipab results` record (with the error), in manifest order."""
    for page in _pages(sessions, batch_id, JobStatus.failed.value, store):
        yield from (record for _, record in page)


def _fetch(store: ObjectStore, key: str, record: dict[str, Any]) -> bytes | None:
    """The job's PNG, checked; None when its image was removed (the record says so, or it is gone)."""
    if record["data_removed_at"] is not None:
        return None
    try:
        data = store.get(key)
    except ObjectMissing:  # expired or deleted since the page was read
        return None
    if hashlib.sha256(data).hexdigest() != record["output_sha256"]:
        raise OutputMismatch(
            f"{store.uri(key)} (job {record['job_id']}) does not have the sha256 {record['output_sha256']} "
            "that SQL recorded; the object was changed after the job finished. Run `ipab retry` on the job"
        )
    return data


def pending_samples(
    sessions: sessionmaker[Session],
    *,
    batch_id: str,
    model_set: str,
    store: ObjectStore,
    exported: set[str],
    removed: set[str] | None = None,
) -> Iterator[Sample]:
    """The batch's succeeded jobs that are not in `exported`, with their PNGs, in manifest order.

    Jobs whose image was removed (expired or deleted) are skipped; their ids go in `removed`.
    """
    fetch: Callable[[tuple[Any, dict[str, Any]]], bytes | None] = lambda item: _fetch(store, item[0], item[1])  # noqa: E731
    with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
        for page in _pages(sessions, batch_id, JobStatus.succeeded.value, store):
            new = [item for item in page if item[1]["job_id"] not in exported]
            for (_, record), png in zip(new, pool.map(fetch, new), strict=True):
                if png is None:
                    if removed is not None:
                        removed.add(record["job_id"])
                    continue
                yield Sample(record["job_id"], png, export_columns(record, model_set=model_set))
