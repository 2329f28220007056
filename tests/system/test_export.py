"""`ipab export`: a batch rendered by a real worker, read back by `datasets`, `webdataset` and `pyarrow`.

Every test compares what the reader gives with SQL: the sha256 of every image, every
row's seed and prompt, and that exactly the succeeded jobs are there.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest

from shared.db import Job, JobStatus
from shared.storage import ObjectStore
from tests.system.conftest import PROMPTS, DatasetBatch, sha256_of

pytestmark = pytest.mark.slow


def succeeded(batch: DatasetBatch) -> dict[str, Job]:
    return {job.id: job for job in batch.jobs() if job.status == JobStatus.succeeded.value}


def prompt_of(job: Job) -> str:
    return str(json.loads(job.spec)["params"]["prompt"])


def assert_rows_match_sql(rows: list[dict[str, Any]], jobs: dict[str, Job]) -> None:
    """`rows` hold `job_id`, `png`, `seed`, `prompt`, `model_hash`, `torch_version`: one per succeeded job, as SQL."""
    assert sorted(r["job_id"] for r in rows) == sorted(jobs)
    for row in rows:
        job = jobs[row["job_id"]]
        assert sha256_of(row["png"]) == job.output_sha256
        assert (row["seed"], row["prompt"]) == (job.seed, prompt_of(job))
        provenance = json.loads(job.provenance or "null")
        assert (row["model_hash"], row["torch_version"]) == (provenance["model_hash"], provenance["versions"]["torch"])


def export(batch: DatasetBatch, out: Path | str, fmt: str, *extra: str) -> str:
    run = batch.ipab("export", batch.batch_id, "--format", fmt, "--out", str(out), *extra)
    assert run.returncode == 0, run.stderr
    assert f"export {fmt}:" in run.stderr  # plain progress lines: stderr is not a terminal
    return run.stdout


def load_imagefolder(out: Path, cache: Path) -> list[dict[str, Any]]:
    from datasets import Image, load_dataset

    dataset = load_dataset("imagefolder", data_dir=str(out), split="train", cache_dir=str(cache))
    assert isinstance(dataset.features["image"], Image)
    raw = dataset.cast_column("image", Image(decode=False))
    return [
        {**row, "png": Path(row["image"]["path"]).read_bytes(), "prompt": row["text"]}
        for row in raw.select_columns(
            ["image", "text", "job_id", "seed", "reference_sha256", "model_hash", "torch_version"]
        )
    ]


def test_imagefolder_loads_with_datasets_and_matches_sql(dataset_batch: DatasetBatch, tmp_path: Path) -> None:
    out = tmp_path / "imagefolder"

    summary = export(dataset_batch, out, "imagefolder")

    jobs = succeeded(dataset_batch)
    rows = load_imagefolder(out, tmp_path / "hf-cache")
    assert_rows_match_sql(rows, jobs)
    assert f"exported {len(jobs)} new job(s)" in summary
    for row in rows:
        references = json.loads(jobs[row["job_id"]].spec)["references"]
        assert row["reference_sha256"] == [r["sha256"] for r in references]
    assert sorted(p.name for p in (out / "train").glob("*.png")) == sorted(f"{j}.png" for j in jobs)


def test_webdataset_shards_load_with_webdataset_and_match_sql(dataset_batch: DatasetBatch, tmp_path: Path) -> None:
    import webdataset as wds

    out = tmp_path / "wds"

    export(dataset_batch, out, "webdataset", "--shard-size", "1B")  # one sample per shard

    jobs = succeeded(dataset_batch)
    shards = sorted(out.glob("shard-*.tar"))
    assert len(shards) == len(jobs)
    samples = list(wds.WebDataset([str(s) for s in shards], shardshuffle=False, empty_check=False))
    rows = []
    for sample in samples:
        metadata = json.loads(sample["json"])
        assert sample["txt"].decode() == metadata["prompt"]
        rows.append({"job_id": sample["__key__"], "png": sample["png"], **metadata})
    assert_rows_match_sql(rows, jobs)


def test_parquet_loads_as_an_image_feature_and_matches_sql(dataset_batch: DatasetBatch, tmp_path: Path) -> None:
    import pyarrow.parquet as pq
    from datasets import Image, load_dataset

    out = tmp_path / "parquet"

    export(dataset_batch, out, "parquet")

    jobs = succeeded(dataset_batch)
    dataset = load_dataset("parquet", data_dir=str(out / "data"), split="train", cache_dir=str(tmp_path / "hf"))
    assert isinstance(dataset.features["image"], Image)
    assert dataset[0]["image"].size == (64, 64)  # decoded to a PIL image
    raw = dataset.cast_column("image", Image(decode=False))
    assert_rows_match_sql([{**row, "png": row["image"]["bytes"]} for row in raw], jobs)
    table = pq.read_table(next((out / "data").glob("*.parquet")))
    assert_rows_match_sql([{**row, "png": row["image"]["bytes"]} for row in table.to_pylist()], jobs)


def test_include_failed_writes_the_failed_jobs_with_their_errors(dataset_batch: DatasetBatch, tmp_path: Path) -> None:
    out = tmp_path / "with-errors"

    summary = export(dataset_batch, out, "imagefolder", "--include-failed")

    failed = [job for job in dataset_batch.jobs() if job.status == JobStatus.failed.value]
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert len(failed) == 2 and f"{len(failed)} failed job(s)" in summary
    assert [e["job_id"] for e in errors] == [job.id for job in failed]
    assert all(e["error"]["type"] == "ObjectMissing" and e["output_uri"] is None for e in errors)
    assert not any((out / "train" / f"{job.id}.png").exists() for job in failed)
    # The folder still loads: errors.jsonl beside train/ is not taken for data.
    assert_rows_match_sql(load_imagefolder(out, tmp_path / "hf-cache"), succeeded(dataset_batch))


def test_export_to_s3_writes_the_same_files_under_the_prefix(dataset_batch: DatasetBatch) -> None:
    store = ObjectStore.from_settings(dataset_batch.settings)

    export(dataset_batch, f"s3://{store.bucket}/exports/one", "webdataset")
    again = export(dataset_batch, f"s3://{store.bucket}/exports/one", "webdataset")

    jobs = succeeded(dataset_batch)
    keys = store.list_keys("exports/one/")
    assert keys == ["exports/one/.ipab-export.json", "exports/one/shard-000000.tar"]
    with tarfile.open(fileobj=io.BytesIO(store.get("exports/one/shard-000000.tar"))) as tar:
        names = tar.getnames()
    assert sorted(names) == sorted(f"{j}.{ext}" for j in jobs for ext in ("png", "json", "txt"))
    assert "exported 0 new job(s)" in again


def test_an_output_of_another_batch_or_format_is_refused(dataset_batch: DatasetBatch, tmp_path: Path) -> None:
    export(dataset_batch, tmp_path / "out", "imagefolder")

    run = dataset_batch.ipab("export", dataset_batch.batch_id, "--format", "parquet", "--out", str(tmp_path / "out"))

    assert run.returncode == 2 and "--out" in run.stderr and "choose another --out" in run.stderr


def test_a_second_export_after_more_jobs_finish_adds_only_those(dataset_batch: DatasetBatch, tmp_path: Path) -> None:
    # Runs last in this module: it grows the batch by one prompt (3 new cells).
    folder, parquet = tmp_path / "imagefolder", tmp_path / "parquet"
    export(dataset_batch, folder, "imagefolder")
    export(dataset_batch, parquet, "parquet")
    before = {p.name: p.stat().st_mtime_ns for p in (folder / "train").glob("*.png")}

    dataset_batch.grow([*PROMPTS, "a robot in the rain"])
    second = export(dataset_batch, folder, "imagefolder")
    export(dataset_batch, parquet, "parquet")

    jobs = succeeded(dataset_batch)
    new = len(jobs) - len(before)
    assert new == 3 and f"exported {new} new job(s)" in second and f"({len(jobs)} in all)" in second
    assert all((folder / "train" / name).stat().st_mtime_ns == mtime for name, mtime in before.items())
    assert_rows_match_sql(load_imagefolder(folder, tmp_path / "hf-cache"), jobs)
    assert len(list((parquet / "data").glob("*.parquet"))) == 2
