"""`--format imagefolder`: `DIR/train/<job id>.png` and `DIR/train/metadata.jsonl`.

What `datasets.load_dataset("imagefolder", data_dir=DIR)` reads: each metadata line has
`file_name` (relative to the metadata file), `text` (the prompt) and every column of
`samples.COLUMNS`. The metadata file is rewritten whole at the end of a run (atomically),
keeping the lines it had and adding one per new job; a job already listed is not listed twice.
"""

from __future__ import annotations

import json
from typing import Final

from scheduler.export.destination import Destination
from scheduler.export.samples import Sample
from scheduler.export.state import ExportState
from scheduler.export.writer import Writer

SPLIT: Final = "train"
METADATA_FILE: Final = f"{SPLIT}/metadata.jsonl"


def metadata_line(sample: Sample) -> str:
    """The sample's line of metadata.jsonl."""
    row = {"file_name": f"{sample.job_id}.png", "text": sample.prompt, **sample.columns}
    return json.dumps(row, ensure_ascii=False)


class ImageFolderWriter(Writer):
    """PNGs under `train/` and one metadata line per image."""

    def __init__(self, dest: Destination, state: ExportState, *, shard_size_bytes: int) -> None:
        super().__init__(dest, state, shard_size_bytes=shard_size_bytes)
        existing = (dest.read(METADATA_FILE) or b"").decode()
        self.lines = [line for line in existing.split("\n") if line.strip()]
        self.listed = {json.loads(line)["job_id"] for line in self.lines}

    def add(self, sample: Sample) -> None:
        """Write the PNG now; its metadata line is written by `close`."""
        self.dest.write(f"{SPLIT}/{sample.job_id}.png", sample.png)
        if sample.job_id not in self.listed:
            self.lines.append(metadata_line(sample))
            self.listed.add(sample.job_id)

    def close(self) -> None:
        """Rewrite metadata.jsonl with the old lines and the new ones."""
        self.dest.write(METADATA_FILE, "".join(line + "\n" for line in self.lines).encode())

    def abort(self) -> None:
        """Leave metadata.jsonl as it was: PNGs written already are listed by the next run."""
