"""Exports and galleries of a batch whose images were partly removed: skipped with a count, or said to be
removed on the card; never a broken link nor a traceback. On SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from scheduler.export.run import export_batch
from scheduler.gallery.build import write_gallery
from shared.db import Batch
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.shared.conftest import World, world_on


@pytest.fixture
def world(settings: Settings, database_url: str, object_store: ObjectStore, redis_url: str) -> Iterator[World]:
    """The janitor's test world on the test's database (SQLite, then PostgreSQL)."""
    with world_on(settings, database_url, object_store, redis_url) as w:
        yield w


def _batch(world: World, batch_id: str) -> Batch:
    with world.sessions() as session:
        return session.scalars(select(Batch).where(Batch.id == batch_id)).one()


def test_an_export_skips_the_jobs_whose_images_were_removed_and_counts_them(world: World, tmp_path: Path) -> None:
    batch_id, jobs = world.batch("b", jobs=4)
    world.expire(jobs[:3])
    world.sweep()

    report = export_batch(
        sessions=world.sessions, store=world.store, batch=_batch(world, batch_id), format_name="imagefolder",
        out=str(tmp_path / "out"),
    )  # fmt: skip

    assert (report.added, report.removed) == (1, 3)
    assert len(list((tmp_path / "out").rglob("*.png"))) == 1


def test_an_image_removed_after_its_row_was_read_is_skipped_too(world: World, tmp_path: Path) -> None:
    batch_id, _ = world.batch("b", jobs=2)
    world.store.delete_many(world.keys_under("outputs/"))  # gone under the export, the record not yet updated

    report = export_batch(
        sessions=world.sessions, store=world.store, batch=_batch(world, batch_id), format_name="webdataset",
        out=str(tmp_path / "out"),
    )  # fmt: skip

    assert (report.added, report.removed) == (0, 2)


def test_a_gallery_card_says_its_output_was_removed(world: World, tmp_path: Path) -> None:
    batch_id, jobs = world.batch("b", jobs=2)
    world.expire(jobs[:1])
    world.sweep()

    index = write_gallery(sessions=world.sessions, store=world.store, batch=_batch(world, batch_id), out_dir=tmp_path)

    page = index.read_text()
    assert page.count("output removed") == 1 and "(expired or deleted)" in page
    assert len(list((tmp_path / "thumbs").glob(f"{jobs[1]}-*.jpg"))) == 1  # the kept one has its thumbnail
