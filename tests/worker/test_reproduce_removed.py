"""`ipab reproduce` of a job whose output the janitor removed says so, instead of failing on a missing object."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest

from shared.errors import InvalidInput
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.shared.conftest import World, world_on
from worker.reproduce import load_record


@pytest.fixture
def world(settings: Settings, sqlite_url: str, object_store: ObjectStore, redis_url: str) -> Iterator[World]:
    """The janitor's test world on SQLite."""
    with world_on(settings, sqlite_url, object_store, redis_url) as w:
        yield w


def test_reproducing_a_job_whose_output_was_removed_says_it_is_gone(world: World) -> None:
    _, (kept, gone) = world.batch("b", jobs=2)
    world.expire([gone], ago=timedelta(minutes=1))
    world.sweep()

    assert load_record(world.sessions, kept).job_id == kept
    with pytest.raises(InvalidInput) as refused:
        load_record(world.sessions, gone)
    assert "output removed at" in str(refused.value) and "expired, or it was deleted" in str(refused.value)
