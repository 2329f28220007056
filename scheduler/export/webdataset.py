"""`--format webdataset`: `.tar` shards of `<key>.png`, `<key>.json` (metadata) and `<key>.txt` (prompt).

The key is the job id (no dots, so WebDataset groups the three files of a sample). Shards
are `shard-000000.tar`, ...; each export run starts a new shard after the last one.
"""

from __future__ import annotations

import json
import tarfile
from datetime import UTC, datetime
from io import BytesIO
from typing import IO, Final

from scheduler.export.destination import Destination
from scheduler.export.samples import Sample
from scheduler.export.state import ExportState
from scheduler.export.writer import ShardedWriter

TAR_BLOCK_BYTES: Final = 512


def sample_files(sample: Sample) -> list[tuple[str, bytes]]:
    """The files of one sample, as (member name, bytes)."""
    metadata = json.dumps(sample.columns, ensure_ascii=False).encode()
    return [
        (f"{sample.job_id}.png", sample.png),
        (f"{sample.job_id}.json", metadata),
        (f"{sample.job_id}.txt", sample.prompt.encode()),
    ]


def _mtime_s(sample: Sample) -> float:
    finished = sample.columns.get("finished_at")
    if not finished:
        return 0.0
    return datetime.fromisoformat(str(finished).removesuffix("Z")).replace(tzinfo=UTC).timestamp()


class WebDatasetWriter(ShardedWriter):
    """Tar shards, rolled at `--shard-size`."""

    name_pattern = "shard-{:06d}.tar"

    def __init__(self, dest: Destination, state: ExportState, *, shard_size_bytes: int) -> None:
        super().__init__(dest, state, shard_size_bytes=shard_size_bytes)
        self._tar: tarfile.TarFile | None = None

    def sample_bytes(self, sample: Sample) -> int:
        """Header and padded content of each member."""
        blocks = sum(1 + -(-len(data) // TAR_BLOCK_BYTES) for _, data in sample_files(sample))
        return blocks * TAR_BLOCK_BYTES

    def begin(self, out: IO[bytes]) -> None:
        """Open a tar stream on the shard."""
        # Open across calls (one shard, many samples): `end` closes it.
        self._tar = tarfile.open(fileobj=out, mode="w|", format=tarfile.PAX_FORMAT)  # noqa: SIM115

    def write(self, sample: Sample) -> None:
        """Append the sample's three members (mode 0644, owned by root, dated when the job finished)."""
        assert self._tar is not None
        for name, data in sample_files(sample):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, _mtime_s(sample)
            self._tar.addfile(info, BytesIO(data))

    def abort(self) -> None:
        """Drop the half-written shard without writing the tar's end blocks to its closed file."""
        if self._tar is not None:
            # Marked closed, or tarfile's stream would flush into the discarded file when collected.
            # (`closed` is an attribute of tarfile's stream and TarFile that typeshed does not list.)
            setattr(self._tar.fileobj, "closed", True)  # noqa: B010
            setattr(self._tar, "closed", True)  # noqa: B010
            self._tar = None
        super().abort()

    def end(self) -> None:
        """Write the tar's end blocks."""
        if self._tar is not None:
            self._tar.close()
            self._tar = None
