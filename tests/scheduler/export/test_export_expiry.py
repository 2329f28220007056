"""Every export format carries each row's `expires_at`: when its image expires in the object store
(ISO 8601 UTC), or null for a job kept for ever (issue 23)."""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, update

from scheduler.export.run import export_batch
from shared.db import Batch, Job
from shared.jobs import transaction
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.shared.conftest import World, world_on


@pytest.fixture
def world(settings: Settings, sqlite_url: str, object_store: ObjectStore, redis_url: str) -> Iterator[World]:
    """The janitor's test world on SQLite (as the other export tests)."""
    with world_on(settings, sqlite_url, object_store, redis_url) as w:
        yield w


def _rows(out: Path, format_name: str) -> list[dict[str, Any]]:
    """The exported metadata rows, whatever the format."""
    if format_name == "imagefolder":
        return [json.loads(line) for line in (out / "train" / "metadata.jsonl").read_text().splitlines()]
    if format_name == "webdataset":
        rows = []
        for shard in sorted(out.glob("shard-*.tar")):
            with tarfile.open(shard) as tar:
                for member in tar.getmembers():
                    if member.name.endswith(".json"):
                        rows.append(json.loads(tar.extractfile(member).read()))  # type: ignore[union-attr]
        return rows
    import pyarrow.parquet as pq

    return [row for path in sorted(out.glob("data/*.parquet")) for row in pq.read_table(path).to_pylist()]


@pytest.mark.parametrize("format_name", ["imagefolder", "webdataset", "parquet"])
def test_an_export_carries_each_rows_expiry_and_null_for_a_job_kept_for_ever(
    world: World, tmp_path: Path, format_name: str
) -> None:
    batch_id, (kept_a_while, kept_for_ever) = world.batch("b", jobs=2, expires_after_s=3600)
    with transaction(world.sessions) as session:
        session.execute(update(Job).where(Job.id == kept_for_ever).values(expires_after_s=None, expires_at=None))
        expires = session.scalar(select(Job.expires_at).where(Job.id == kept_a_while))
        batch = session.scalars(select(Batch).where(Batch.id == batch_id)).one()
    assert expires is not None

    out = tmp_path / "out"
    report = export_batch(
        sessions=world.sessions, store=world.store, batch=batch, format_name=format_name, out=str(out)
    )

    assert report.added == 2
    by_job = {row["job_id"]: row["expires_at"] for row in _rows(out, format_name)}
    assert by_job == {kept_a_while: expires.isoformat() + "Z", kept_for_ever: None}
