"""`--format parquet`: `data/train-00000.parquet`, ...: the image as `{bytes, path}` plus the metadata columns.

The schema carries the Hugging Face features metadata (`huggingface` key) that marks the
`image` column as an `Image` feature, so `datasets` decodes it to a PIL image. pyarrow is
imported only here, when a parquet export runs: `pip install 'ipab[export]'` installs it.
"""

from __future__ import annotations

import json
from typing import IO, TYPE_CHECKING, Any, Final

from scheduler.export.destination import Destination
from scheduler.export.samples import COLUMNS, Sample
from scheduler.export.state import ExportState
from scheduler.export.writer import ShardedWriter
from shared.errors import InvalidInput

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

ROW_GROUP_ROWS: Final = 100  # what the Hugging Face Hub recommends for image datasets
HF_FEATURES: Final = {"info": {"features": {"image": {"_type": "Image"}}}}
INT_COLUMNS: Final = frozenset({"line", "seed", "width", "height", "steps", "output_bytes"})
FLOAT_COLUMNS: Final = frozenset({"guidance_scale", "ip_adapter_scale"})
LIST_COLUMNS: Final = frozenset({"reference_sha256", "reference_uri"})


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise InvalidInput(
            "--format", "parquet", "needs pyarrow, which is not installed: pip install 'ipab[export]'"
        ) from None
    return pyarrow


def arrow_schema(pa_module: Any) -> pa.Schema:
    """The file schema: `image` struct first, then `COLUMNS`, with the features metadata."""

    def column_type(name: str) -> Any:
        if name in INT_COLUMNS:
            return pa_module.int64()
        if name in FLOAT_COLUMNS:
            return pa_module.float64()
        return pa_module.list_(pa_module.string()) if name in LIST_COLUMNS else pa_module.string()

    image = pa_module.struct([("bytes", pa_module.binary()), ("path", pa_module.string())])
    fields = [pa_module.field("image", image), *(pa_module.field(n, column_type(n)) for n in COLUMNS)]
    return pa_module.schema(fields, metadata={"huggingface": json.dumps(HF_FEATURES)})


class ParquetWriter(ShardedWriter):
    """Parquet files of row groups of `ROW_GROUP_ROWS` rows, rolled at `--shard-size`."""

    name_pattern = "data/train-{:05d}.parquet"

    def __init__(self, dest: Destination, state: ExportState, *, shard_size_bytes: int) -> None:
        super().__init__(dest, state, shard_size_bytes=shard_size_bytes)
        self._pa = _pyarrow()  # refused before anything is read or written
        self._schema = arrow_schema(self._pa)
        self._file: pq.ParquetWriter | None = None
        self._rows: list[dict[str, Any]] = []

    def sample_bytes(self, sample: Sample) -> int:
        """The PNG's size (the metadata is small and compressed)."""
        return len(sample.png)

    def begin(self, out: IO[bytes]) -> None:
        """Open a parquet file on the stream."""
        self._file = self._pa.parquet.ParquetWriter(out, self._schema)

    def write(self, sample: Sample) -> None:
        """Buffer the row; a full row group is written out."""
        self._rows.append({"image": {"bytes": sample.png, "path": f"{sample.job_id}.png"}, **sample.columns})
        if len(self._rows) >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        if self._rows and self._file is not None:
            self._file.write_table(self._pa.Table.from_pylist(self._rows, schema=self._schema))
            self._rows = []

    def end(self) -> None:
        """Write the last row group and the footer."""
        self._flush()
        if self._file is not None:
            self._file.close()
            self._file = None

    def abort(self) -> None:
        """Drop the buffered rows and the half-written file."""
        self._rows = []
        self._file = None
        super().abort()
