"""Export pieces that need no services: sizes, the state file, the parquet extra, the shard roll-over."""

from __future__ import annotations

import sys
import tarfile
from pathlib import Path

import pytest

from scheduler.export.destination import LocalDir
from scheduler.export.parquet import ParquetWriter
from scheduler.export.samples import COLUMNS, Sample
from scheduler.export.state import ExportState, load_state, save_state
from scheduler.export.webdataset import WebDatasetWriter
from scheduler.export.writer import parse_size_bytes
from shared.errors import InvalidInput


@pytest.mark.parametrize(
    ("text", "size"), [("1GB", 10**9), ("500MB", 5 * 10**8), ("2GiB", 2 * 1024**3), ("1.5k", 1500), ("123", 123)]
)
def test_shard_sizes_read_as_bytes(text: str, size: int) -> None:
    assert parse_size_bytes(text) == size


def test_a_bad_shard_size_names_the_option() -> None:
    with pytest.raises(InvalidInput) as info:
        parse_size_bytes("big")
    assert info.value.field == "--shard-size" and "500MB" in str(info.value)


def test_an_output_holding_another_export_is_refused(tmp_path: Path) -> None:
    dest = LocalDir(tmp_path)
    save_state(dest, ExportState("batch-a", "imagefolder", {"j1"}, 0))

    assert load_state(dest, batch_id="batch-a", format_name="imagefolder").exported == {"j1"}
    with pytest.raises(InvalidInput) as info:
        load_state(dest, batch_id="batch-b", format_name="imagefolder")
    assert info.value.field == "--out" and "batch-a" in str(info.value)


def test_parquet_without_pyarrow_says_what_to_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # `import pyarrow` raises ImportError

    with pytest.raises(InvalidInput) as info:
        ParquetWriter(LocalDir(tmp_path), ExportState("b", "parquet"), shard_size_bytes=10)

    assert "pip install 'ipab[export]'" in str(info.value)


def sample(job_id: str, size_bytes: int) -> Sample:
    columns = dict.fromkeys(COLUMNS, None) | {"job_id": job_id, "prompt": f"prompt {job_id}", "finished_at": None}
    return Sample(job_id, b"\x89PNG" + bytes(size_bytes), columns)


def test_webdataset_shards_roll_at_the_size_and_continue_numbering(tmp_path: Path) -> None:
    dest, state = LocalDir(tmp_path), ExportState("b", "webdataset", next_shard=3)

    with WebDatasetWriter(dest, state, shard_size_bytes=6000) as writer:
        for i in range(5):
            writer.add(sample(f"j{i}", 2000))  # ~3.5 KB in the tar: one per shard at 6000 bytes

    shards = sorted(tmp_path.glob("shard-*.tar"))
    assert [s.name for s in shards] == [f"shard-{n:06d}.tar" for n in range(3, 8)] and state.next_shard == 8
    with tarfile.open(shards[0]) as tar:
        assert tar.getnames() == ["j0.png", "j0.json", "j0.txt"]


def test_a_failed_run_leaves_no_half_written_shard(tmp_path: Path) -> None:
    with (
        pytest.raises(RuntimeError),
        WebDatasetWriter(LocalDir(tmp_path), ExportState("b", "webdataset"), shard_size_bytes=10**9) as writer,
    ):
        writer.add(sample("j0", 10))
        raise RuntimeError("S3 went away")

    assert list(tmp_path.iterdir()) == []
