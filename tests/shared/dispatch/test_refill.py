"""A queue that workers drain is topped up at half its depth, not at every take: a worker's take
wakes the dispatcher only when it leaves the queue at that level, and the dispatcher's round then
moves several messages. New work is still pushed at once (an interactive job waits for no drain)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar, Final

import pytest
import redis
from PIL import Image

from scheduler.submission.submit import submit_manifest
from shared.db import make_engine, make_session_factory
from shared.dispatch.dispatcher import MAX_DEPTH, RATE_WINDOW_S, Dispatcher, TakeRate, queue_depth
from shared.dispatch.wake import level_key, refill_level, refill_room, signal_key
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


def _drain_fast(dispatcher: Dispatcher, client: redis.Redis, settings: Settings, rounds: int) -> list[int]:
    """Workers that take two messages between rounds, as fast as they can; the queue's length after each round."""
    lengths = []
    for _ in range(rounds):
        _take(client, settings)
        _take(client, settings)
        dispatcher.dispatch_once()
        lengths.append(int(client.llen(QUEUE)))
    return lengths


@pytest.mark.parametrize("horizon_s", [0.5, 0.0])
def test_a_queue_drained_faster_than_its_depth_per_horizon_deepens(
    depth_settings: Settings, client: redis.Redis, tmp_path: Path, horizon_s: float
) -> None:
    settings = depth_settings.model_copy(update={"dispatch_horizon_s": horizon_s})
    _submit(settings, tmp_path, "bulk", 80)
    engine = make_engine(settings.database_url)
    dispatcher = Dispatcher.from_settings(
        sessions=make_session_factory(engine), redis_client=client, settings=settings, model_set=MODEL_SET
    )
    level = level_key(settings.redis_prefix, MODEL_SET)
    try:
        assert dispatcher.dispatch_once() == DEPTH
        lengths = _drain_fast(dispatcher, client, settings, rounds=12)  # 24 takes well within a second
        if horizon_s == 0:  # exactly IPAB_DISPATCH_DEPTH, however fast the workers
            assert max(lengths) == DEPTH and client.get(level) is None
            return
        # 24 takes in the last second x 0.5 s: what the fleet takes in the horizon, not 4.
        assert max(lengths) >= 10, lengths
        # The workers' takes signal the dispatcher at half the deeper queue, not at 2 of it.
        deep_level = int(client.get(level) or 0)
        assert deep_level >= refill_level(10) and int(client.llen(QUEUE)) > deep_level + 1
        _signalled(client, settings)
        while int(client.llen(QUEUE)) > deep_level + 1:
            _take(client, settings)
        assert not _signalled(client, settings)
        _take(client, settings)
        assert _signalled(client, settings)

        # Once the takes of the last second are gone, the queue is kept at its depth again.
        time.sleep(RATE_WINDOW_S + 0.05)
        dispatcher.dispatch_once()
        assert client.get(level) is None
        _drain_fast(dispatcher, client, settings, rounds=1)
        assert int(client.llen(QUEUE)) <= DEPTH
    finally:
        client.delete(level)
        engine.dispose()


def test_the_take_rate_is_the_last_window_s_takes_over_the_whole_window() -> None:
    rate = TakeRate(window_s=1.0)
    rate.add(10.0, 4)  # a burst of 4: 4 per second, not 4 per instant
    assert rate.per_s() == 4.0
    rate.add(10.5, 6)
    assert rate.per_s() == 10.0
    rate.add(11.2, 0)  # the first takes are out of the window
    assert rate.per_s() == 6.0
    assert queue_depth(configured=4, horizon_s=0.25, takes_per_s=100.0) == 25
    assert queue_depth(configured=4, horizon_s=0.25, takes_per_s=8.0) == 4  # a slow fleet keeps the setting
    assert queue_depth(configured=4, horizon_s=0.0, takes_per_s=1e6) == 4
    assert queue_depth(configured=4, horizon_s=10.0, takes_per_s=1e6) == MAX_DEPTH


class _CountingConnection(redis.Connection):
    """Notes each round trip's command names (one `send_packed_command` per command or pipeline)."""

    round_trips: ClassVar[list[list[str]]] = []

    def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        chunks = [command] if isinstance(command, bytes | str) else list(command)
        payload = b"".join(c.encode() if isinstance(c, str) else bytes(c) for c in chunks)
        # RESP arrays: "*N\r\n$len\r\nNAME\r\n...": each command's name follows its first length line.
        names = [part.split(b"\r\n")[2].decode().upper() for part in payload.split(b"*")[1:] if b"\r\n$" in part]
        _CountingConnection.round_trips.append(names)
        super().send_packed_command(command, check_health)


def test_a_take_costs_redis_plain_commands_in_one_round_trip_and_a_second_only_to_signal(
    depth_settings: Settings, client: redis.Redis, dispatcher: Dispatcher
) -> None:
    """Every job's take runs this: a Lua script for it cost Redis five times its commands' CPU."""
    _signalled(client, depth_settings)
    counting = redis.Redis.from_url(depth_settings.redis_url, connection_class=_CountingConnection)
    try:
        counting.ping()
        _CountingConnection.round_trips.clear()
        _take(counting, depth_settings)  # 3 left: above the level
        _take(counting, depth_settings)  # 2 left: the level, the dispatcher is signalled
    finally:
        counting.close()
    trips = _CountingConnection.round_trips
    assert [t for t in trips if t != ["RPOP"]] == [
        ["SREM", "GET", "LLEN", "DEL"],
        ["SREM", "GET", "LLEN", "DEL"],
        ["LPUSH", "LTRIM"],
    ], trips
    assert _signalled(client, depth_settings)
