"""`ipab reproduce JOB_ID`: render a finished job again from its record and compare with its PNG.

The record is the job's row (spec, seed, provenance) and its PNG in object storage; the
local model set is hashed first (cached, `worker.provenance`), and when any weight file
differs from the record the job is not rendered: the answer names the files. Otherwise the
job takes the worker's path (references from storage -> `Renderer.encode` -> `generate` ->
`encode_png` with this process's provenance) on the recorded dtype and CPU thread count, and
the answer is `identical bytes`, `identical pixels` (only the metadata differs, e.g. another
device or library version), or the largest pixel difference (0-255).
"""

from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from sqlalchemy.orm import Session, sessionmaker

from shared.db import Job, JobStatus
from shared.errors import InvalidInput
from shared.jobs import transaction
from shared.model_set import ModelSetConfig
from shared.spec import JobSpec, parse_spec
from shared.storage import ObjectStore
from worker.provenance import ModelSetHashes, Provenance, compare_files


@dataclass(frozen=True)
class JobRecord:
    """What SQL holds about a finished job: enough to render it again and check the result."""

    job_id: str
    spec: JobSpec
    output_key: str
    output_sha256: str
    provenance: dict[str, Any] | None


@dataclass
class Outcome:
    """The answer: a verdict (`identical bytes`, `identical pixels`, `pixels differ`, `weights differ`)."""

    verdict: str
    max_pixel_diff: int | None = None
    details: list[str] = field(default_factory=list)
    png: bytes | None = None

    @property
    def reproduced(self) -> bool:
        """True when the pixels are the recorded ones."""
        return self.verdict in ("identical bytes", "identical pixels")


def load_record(sessions: sessionmaker[Session], job_id: str) -> JobRecord:
    """The job's record; refused unless it exists and succeeded (only those have an output)."""
    with transaction(sessions) as session:
        job = session.get(Job, job_id)
        if job is None:
            raise InvalidInput("JOB_ID", job_id, "no such job; `ipab results BATCH` lists a batch's job ids")
        if job.status != JobStatus.succeeded.value or not job.output_key or not job.output_sha256:
            raise InvalidInput("JOB_ID", job_id, f"is {job.status}; only a succeeded job can be reproduced")
        if job.data_state is not None:
            when = f"at {job.data_removed_at.isoformat()}Z " if job.data_removed_at else ""
            raise InvalidInput(
                "JOB_ID",
                job_id,
                f"had its output removed {when}(its retention expired, or it was deleted): there is no image to "
                "compare with; `ipab generate` renders its parameters again without the check",
            )
        return JobRecord(
            job_id=job.id,
            spec=parse_spec(json.loads(job.spec)),
            output_key=job.output_key,
            output_sha256=job.output_sha256,
            provenance=json.loads(job.provenance) if job.provenance else None,
        )


def weight_differences(record: JobRecord, hashes: ModelSetHashes) -> list[str]:
    """One line per weight file whose sha256 differs from the record (empty: same weights, or no record)."""
    if record.provenance is None:
        return []
    return compare_files(dict(record.provenance.get("files", {})), hashes.files)


def original_png(store: ObjectStore, record: JobRecord) -> bytes:
    """The job's PNG from storage, checked against the sha256 SQL recorded."""
    data = store.get(record.output_key)
    if hashlib.sha256(data).hexdigest() != record.output_sha256:
        raise InvalidInput(
            "output",
            store.uri(record.output_key),
            f"does not have the recorded sha256 {record.output_sha256}; the object changed after the job finished",
        )
    return data


def render_again(renderer: Any, record: JobRecord, store: ObjectStore, hashes: ModelSetHashes) -> bytes:
    """The job through the worker's path, as PNG bytes carrying this process's provenance."""
    from shared.images import decode_reference
    from worker.png import encode_png

    images = [decode_reference(store.get(ref.key), field=f"reference {ref.key}") for ref in record.spec.references]
    image = renderer.generate(record.spec.params, renderer.encode(images))
    provenance = Provenance.of(renderer, hashes=hashes)
    return encode_png(image, params=record.spec.params, model_set=renderer.name, provenance=provenance)


def compare_pngs(original: bytes, again: bytes) -> Outcome:
    """`identical bytes`, else `identical pixels`, else `pixels differ` with the largest difference."""
    if original == again:
        return Outcome("identical bytes", max_pixel_diff=0, png=again)
    a, b = (np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.int16) for data in (original, again))
    if a.shape != b.shape:
        return Outcome("pixels differ", details=[f"size {b.shape[1]}x{b.shape[0]}, recorded {a.shape[1]}x{a.shape[0]}"])
    diff = int(np.abs(a - b).max())
    verdict = "identical pixels" if diff == 0 else "pixels differ"
    details = ["the PNG metadata differs (device, versions or model set)"] if diff == 0 else []
    return Outcome(verdict, max_pixel_diff=diff, details=details, png=again)


def recorded_dtype(record: JobRecord, default: str) -> str:
    """The dtype the job ran in (`float16`, ...), or `default` when the record has none."""
    dtype = (record.provenance or {}).get("dtype")
    return str(dtype) if dtype in ("float16", "bfloat16", "float32") else default


def use_recorded_threads(record: JobRecord) -> None:
    """Run on as many CPU threads as the worker did: CPU float reductions depend on it."""
    import torch

    threads = (record.provenance or {}).get("cpu_threads")
    if isinstance(threads, int) and threads > 0:
        torch.set_num_threads(threads)


def model_set_note(record: JobRecord, config: ModelSetConfig) -> list[str]:
    """Notes on what the record cannot vouch for: no provenance (older job), another model-set name."""
    if record.provenance is None:
        return ["the job has no provenance record (rendered before ipab recorded one): weights not compared"]
    name = record.provenance.get("model_set")
    return [] if name == config.name else [f"model set {config.name!r} here, {name!r} in the record"]


def write_png(path: Path, data: bytes) -> None:
    """Write the re-rendered PNG."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
