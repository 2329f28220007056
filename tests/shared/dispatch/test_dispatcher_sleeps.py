"""An idle dispatcher sleeps in Redis instead of polling; a signal makes it dispatch at once.

The dispatcher runs inside every worker, beside the render: each time it wakes up it takes a
core from the denoising loop. So when there is nothing to do it wakes a few times per second
at most, yet a submission, or a worker that took a message, still gets the next job into
Redis within a fraction of a second, and a dispatcher that died is still replaced.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from scheduler.submission.submit import submit_manifest
from shared import keys
from shared.db import ensure_database, make_engine, make_session_factory
from shared.dispatch import dispatcher as dispatcher_module
from shared.dispatch.dispatcher import _Loop, run_dispatcher, wake_dispatcher
from shared.queue import forget_queued
from shared.settings import Settings
from shared.wire import decode_render_envelope
from tests.scheduler.submission.conftest import write_jsonl

MODEL_SET = "tiny-wakes"
QUEUE = keys.render_queue(MODEL_SET)
IDLE_S = 2.0
MAX_WAKEUPS_PER_S = 3  # "a few": the old loop woke 50 times a second
PROMPT_S = 0.5


@pytest.fixture
def wake_settings(settings: Settings, tmp_path: Path) -> Settings:
    """Timers so long that only a signal can explain a prompt dispatch (a wait ends after 5 s at most)."""
    ensure_database(settings.database_url)
    return settings.model_copy(
        update={"reference_roots": [tmp_path], "dispatch_rescan_s": 60.0, "dispatch_lock_s": 60.0}
    )


@pytest.fixture
def lock_checks(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The times at which any dispatch loop woke up for a round (and looked at its lock, in Redis
    or, renewed a moment ago, in memory): once per wake-up and model set."""
    checks: list[float] = []
    hold = _Loop._hold

    def counting(self: _Loop, name: str) -> bool:
        checks.append(time.monotonic())
        return hold(self, name)

    monkeypatch.setattr(_Loop, "_hold", counting)
    return checks


@contextlib.contextmanager
def dispatch_loop(settings: Settings) -> Iterator[None]:
    """`run_dispatcher` for MODEL_SET on a thread, as a worker runs it."""
    engine = make_engine(settings.database_url)
    client = redis.Redis.from_url(settings.redis_url)
    stop = threading.Event()
    kwargs = {"sessions": make_session_factory(engine), "redis_client": client, "settings": settings}
    thread = threading.Thread(
        target=run_dispatcher, kwargs={**kwargs, "model_sets": lambda: [MODEL_SET], "stop": stop}, daemon=True
    )
    thread.start()
    try:
        yield
    finally:
        stop.set()
        wake_dispatcher(redis_client=client, settings=settings, model_set=MODEL_SET)  # end its wait now
        thread.join(timeout=10)
        engine.dispose()
        client.close()


def _submit(settings: Settings, folder: Path, name: str, rows: int) -> None:
    from PIL import Image

    Image.new("RGB", (16, 16), (1, 2, 3)).save(folder / "ref.png")
    lines = [{"reference": "ref.png", "prompt": f"{name} {i}", "seed": i} for i in range(rows)]
    manifest = write_jsonl(folder / f"{name}.jsonl", lines)
    submit_manifest(settings=settings, path=manifest, batch_name=name, model_set_name=MODEL_SET)


def _seconds_until(condition: Callable[[], bool], *, timeout_s: float = 10.0) -> float:
    start = time.monotonic()
    while not condition():
        assert time.monotonic() - start < timeout_s, f"not within {timeout_s} s"
        time.sleep(0.005)
    return time.monotonic() - start


def _queue_length(settings: Settings) -> int:
    return int(redis.Redis.from_url(settings.redis_url).llen(QUEUE))


@pytest.mark.parametrize("backlog", [0, 20], ids=["nothing-queued", "queue-full-and-jobs-waiting"])
def test_a_dispatcher_with_nothing_to_do_wakes_up_a_few_times_per_second_at_most(
    settings: Settings, tmp_path: Path, lock_checks: list[float], backlog: int
) -> None:
    # With jobs waiting and the queue full, a worker is busy rendering: nothing is due until it takes a message.
    ensure_database(settings.database_url)
    settings = settings.model_copy(update={"reference_roots": [tmp_path]})  # the default timers: 2 s, 5 s lock
    if backlog:
        _submit(settings, tmp_path, "bulk", backlog)
    with dispatch_loop(settings):
        _seconds_until(lambda: _queue_length(settings) == min(backlog, settings.dispatch_depth))
        time.sleep(0.5)  # its first rounds: the lock taken, the backlog read, the queue filled
        start = len(lock_checks)
        time.sleep(IDLE_S)
        wakeups = len(lock_checks) - start
    assert wakeups <= MAX_WAKEUPS_PER_S * IDLE_S, f"{wakeups} wake-ups in {IDLE_S} s with nothing to do"


def test_a_submission_to_an_idle_dispatcher_reaches_redis_at_once(wake_settings: Settings, tmp_path: Path) -> None:
    with dispatch_loop(wake_settings):
        time.sleep(0.5)  # idle, blocked in Redis, its next timer seconds away
        _submit(wake_settings, tmp_path, "urgent", 1)
        waited_s = _seconds_until(lambda: _queue_length(wake_settings) == 1)
    assert waited_s < PROMPT_S


def test_a_worker_that_takes_a_message_gets_the_next_one_into_redis_at_once(
    wake_settings: Settings, tmp_path: Path
) -> None:
    settings = wake_settings.model_copy(update={"dispatch_depth": 1})
    client = redis.Redis.from_url(settings.redis_url)
    _submit(settings, tmp_path, "bulk", 3)
    with dispatch_loop(settings):
        _seconds_until(lambda: _queue_length(settings) == 1)
        time.sleep(0.5)  # the queue is full: the dispatcher sleeps
        taken = client.rpop(QUEUE)  # what Celery's consumer does, then the runner's claim
        assert isinstance(taken, bytes)
        job_id = decode_render_envelope(taken).job_id
        forget_queued(redis_client=client, prefix=settings.redis_prefix, job_id=job_id, model_set=MODEL_SET)
        waited_s = _seconds_until(lambda: _queue_length(settings) == 1)
    assert waited_s < PROMPT_S
    assert decode_render_envelope(client.lindex(QUEUE, 0)).job_id != job_id  # type: ignore[arg-type]


def test_a_dispatcher_whose_holder_died_is_replaced_once_the_lock_lapses(settings: Settings, tmp_path: Path) -> None:
    ensure_database(settings.database_url)
    settings = settings.model_copy(update={"reference_roots": [tmp_path], "dispatch_lock_s": 1.0})
    lock_key = settings.redis_prefix + keys.DISPATCH_LOCK_KEY.format(model_set=MODEL_SET)
    redis.Redis.from_url(settings.redis_url).set(lock_key, "a-dead-worker", px=1000)  # renewed no more
    _submit(settings, tmp_path, "orphan", 1)
    with dispatch_loop(settings):  # a standby replica: it checks the lock a few times per second
        waited_s = _seconds_until(lambda: _queue_length(settings) == 1)
    assert waited_s < 1.0 + 2 * 1.0 / dispatcher_module.STANDBY_CHECKS + PROMPT_S
