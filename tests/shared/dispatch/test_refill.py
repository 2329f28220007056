"""A queue that workers drain is topped up at half its depth, not at every take: a worker's take
wakes the dispatcher only when it leaves the queue at that level, and the dispatcher's round then
moves several messages. New work is still pushed at once (an interactive job waits for no drain)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Final

import pytest
import redis
from PIL import Image

from scheduler.submission.submit import submit_manifest
from shared.db import make_engine, make_session_factory
from shared.dispatch.dispatcher import Dispatcher
from shared.dispatch.wake import refill_level, refill_room, signal_key
from shared.keys import render_queue
from shared.queue import forget_queued
from shared.settings import Settings
from shared.wire import decode_render_envelope

MODEL_SET: Final = "tiny-refill"
QUEUE: Final = render_queue(MODEL_SET)
DEPTH: Final = 4


@pytest.fixture
def depth_settings(settings: Settings, tmp_path: Path) -> Settings:
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "ref.png")
    return settings.model_copy(
        update={"reference_roots": [tmp_path], "dispatch_depth": DEPTH, "dispatch_rescan_s": 60.0}
    )


@pytest.fixture
def client(depth_settings: Settings) -> Iterator[redis.Redis]:
    c = redis.Redis.from_url(depth_settings.redis_url)
    c.delete(QUEUE)
    yield c
    c.delete(QUEUE)
    c.close()


def _submit(settings: Settings, folder: Path, name: str, rows: int, lane: str = "bulk") -> None:
    manifest = folder / f"{name}.jsonl"
    manifest.write_text(
        "".join(json.dumps({"reference": "ref.png", "prompt": f"{name} {i}"}) + "\n" for i in range(rows))
    )
    submit_manifest(settings=settings, path=manifest, batch_name=name, model_set_name=MODEL_SET, lane=lane)


@pytest.fixture
def dispatcher(depth_settings: Settings, client: redis.Redis, tmp_path: Path) -> Iterator[Dispatcher]:
    """A dispatcher whose queue it has just filled to its depth from a 20-job backlog."""
    _submit(depth_settings, tmp_path, "bulk", 20)
    engine = make_engine(depth_settings.database_url)
    dispatcher = Dispatcher.from_settings(
        sessions=make_session_factory(engine), redis_client=client, settings=depth_settings, model_set=MODEL_SET
    )
    assert dispatcher.dispatch_once() == DEPTH
    yield dispatcher
    engine.dispose()


def _take(client: redis.Redis, settings: Settings) -> None:
    """What a worker does: take the next message, then forget it (and maybe signal)."""
    raw = client.rpop(QUEUE)
    assert isinstance(raw, bytes)
    job_id = decode_render_envelope(raw).job_id
    forget_queued(
        redis_client=client,
        prefix=settings.redis_prefix,
        job_id=job_id,
        model_set=MODEL_SET,
        signal_at=refill_level(settings.dispatch_depth),
    )


def _signalled(client: redis.Redis, settings: Settings) -> bool:
    return client.lpop(signal_key(settings.redis_prefix, MODEL_SET)) is not None


def test_the_levels_are_half_the_depth() -> None:
    assert [(refill_room(d), refill_level(d)) for d in (1, 2, 4, 8)] == [(1, 0), (1, 1), (2, 2), (4, 4)]


def test_a_drained_queue_is_topped_up_at_half_its_depth_and_new_work_at_once(
    depth_settings: Settings, client: redis.Redis, tmp_path: Path, dispatcher: Dispatcher
) -> None:
    _signalled(client, depth_settings)  # the submission's own signal

    _take(client, depth_settings)  # 3 left: above the level, no signal, and a round moves nothing
    assert not _signalled(client, depth_settings)
    assert dispatcher.dispatch_once() == 0 and dispatcher.idle_s() == float("inf")
    _take(client, depth_settings)  # 2 left: the level
    assert _signalled(client, depth_settings)
    assert dispatcher.dispatch_once() == 2 and client.llen(QUEUE) == DEPTH

    _take(client, depth_settings)  # 3 left again: new work is read and pushed at once, drained or not
    _submit(depth_settings, tmp_path, "urgent", 1, lane="interactive")
    assert dispatcher.dispatch_once() == 1 and client.llen(QUEUE) == DEPTH


def test_new_work_that_finds_the_queue_full_goes_in_at_the_next_take(
    depth_settings: Settings, client: redis.Redis, tmp_path: Path, dispatcher: Dispatcher
) -> None:
    _submit(depth_settings, tmp_path, "urgent", 1, lane="interactive")
    assert dispatcher.dispatch_once() == 0  # full: the interactive job waits for a take
    _signalled(client, depth_settings)

    _take(client, depth_settings)  # 3 left, above the level: signalled all the same, the dispatcher asked
    assert _signalled(client, depth_settings)
    assert dispatcher.dispatch_once() == 1
    _take(client, depth_settings)  # the flag was used up: an ordinary take above the level signals nothing
    assert not _signalled(client, depth_settings)
