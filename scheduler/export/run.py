"""One export run: open the output and its state, write the new samples, the errors file, then the state."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from sqlalchemy.orm import Session, sessionmaker

from scheduler.export.destination import Destination, open_destination
from scheduler.export.imagefolder import ImageFolderWriter
from scheduler.export.parquet import ParquetWriter
from scheduler.export.samples import count_pending, failed_records, pending_samples
from scheduler.export.state import ExportState, load_state, save_state
from scheduler.export.webdataset import WebDatasetWriter
from scheduler.export.writer import DEFAULT_SHARD_SIZE_BYTES, Writer
from scheduler.terminal_progress import SILENT, Reporter, Stage
from shared.db import Batch
from shared.storage import ObjectStore

ERRORS_FILE: Final = "errors.jsonl"
WRITERS: Final[dict[str, Callable[..., Writer]]] = {
    "imagefolder": ImageFolderWriter,
    "webdataset": WebDatasetWriter,
    "parquet": ParquetWriter,
}  # one per name of `scheduler.export.formats.FORMATS`


@dataclass(frozen=True)
class ExportReport:
    """What one run did: jobs added now, jobs in the export in all, failed jobs listed (None: not asked)."""

    where: str
    added: int
    total: int
    failed: int | None
    removed: int = 0  # succeeded jobs skipped: their images were removed (expired or deleted)


def write_errors(dest: Destination, sessions: sessionmaker[Session], *, batch_id: str, store: ObjectStore) -> int:
    """Rewrite `errors.jsonl`: one `ipab results` record per failed job (as of now); returns how many."""
    lines = [json.dumps(r, ensure_ascii=False) for r in failed_records(sessions, batch_id=batch_id, store=store)]
    dest.write(ERRORS_FILE, "".join(line + "\n" for line in lines).encode())
    return len(lines)


def _write_samples(
    writer: Writer,
    state: ExportState,
    sessions: sessionmaker[Session],
    batch: Batch,
    store: ObjectStore,
    *,
    stage: Stage,
    removed: set[str],
) -> int:
    added = 0
    samples = pending_samples(
        sessions, batch_id=batch.id, model_set=batch.model_set, store=store, exported=state.exported, removed=removed
    )
    with writer:
        for sample in samples:
            writer.add(sample)
            state.exported.add(sample.job_id)
            added += 1
            stage.advance()
    return added


def export_batch(
    *,
    sessions: sessionmaker[Session],
    store: ObjectStore,
    batch: Batch,
    format_name: str,
    out: str,
    include_failed: bool = False,
    shard_size_bytes: int = DEFAULT_SHARD_SIZE_BYTES,
    progress: Reporter = SILENT,
) -> ExportReport:
    """Export the batch's succeeded jobs that `out` does not hold yet; `--include-failed` adds errors.jsonl."""
    # 1. The output and what it holds already (refused if it holds another batch or format).
    dest = open_destination(out, store=store)
    state = load_state(dest, batch_id=batch.id, format_name=format_name)
    writer = WRITERS[format_name](dest, state, shard_size_bytes=shard_size_bytes)  # parquet: pyarrow checked here
    # 2. Count, then write the new samples (PNGs fetched and checked against SQL's sha256).
    total = count_pending(sessions, batch_id=batch.id, exported=state.exported)
    removed: set[str] = set()
    with progress.stage(f"export {format_name}", total=total) as stage:
        added = _write_samples(writer, state, sessions, batch, store, stage=stage, removed=removed)
    # 3. The failed jobs, as they are now.
    failed = write_errors(dest, sessions, batch_id=batch.id, store=store) if include_failed else None
    # 4. The state, last: a run stopped before this point is repeated, never skipped.
    save_state(dest, state)
    return ExportReport(dest.describe(), added, len(state.exported), failed, len(removed))
