"""An interactive job waits behind no bulk message, and a CLI submission wakes the dispatcher.

Workers take messages from the right of the queue's list (kombu's Redis transport pushes on
the left, pops on the right). The dispatcher keeps a few bulk messages waiting there; an
interactive job's message goes in at the right, behind the interactive ones still waiting
and ahead of every other. `ipab submit --lane interactive` bumps the dispatcher's wake
counter and signals it, and that, not a timer, is what makes its next round read the job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from PIL import Image

from scheduler.submission.submit import submit_manifest
from shared import keys
from shared.db import ensure_database, make_engine, make_session_factory
from shared.dispatch import dispatcher as dispatcher_module
from shared.dispatch.dispatcher import Dispatcher
from shared.dispatch.wake import signal_key, wait_for_signal, wake_key
from shared.settings import Settings
from shared.wire import JobMessage, decode_render_envelope

MODEL_SET = "tiny-front"
QUEUE = keys.render_queue(MODEL_SET)


@pytest.fixture
def front_settings(settings: Settings, tmp_path: Path) -> Settings:
    """Ten messages deep, and no timer re-reads SQL during a test: only a wake (or `rescan`) does."""
    ensure_database(settings.database_url)
    Image.new("RGB", (16, 16), (1, 2, 3)).save(tmp_path / "ref.png")
    update = {"reference_roots": [tmp_path], "dispatch_depth": 10, "dispatch_rescan_s": 60.0}
    return settings.model_copy(update=update)


@pytest.fixture
def no_burst_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    """A wake re-reads SQL in the very next round (not once MIN_RESCAN_S has passed since the last)."""
    monkeypatch.setattr(dispatcher_module, "MIN_RESCAN_S", 0.0)


@pytest.fixture
def client(front_settings: Settings) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(front_settings.redis_url)
    yield client
    client.close()


@pytest.fixture
def dispatcher(front_settings: Settings, client: redis.Redis) -> Iterator[Dispatcher]:
    engine = make_engine(front_settings.database_url)
    yield Dispatcher.from_settings(
        sessions=make_session_factory(engine), redis_client=client, settings=front_settings, model_set=MODEL_SET
    )
    engine.dispose()


def _manifest(folder: Path, name: str, rows: int) -> Path:
    path = folder / f"{name}.jsonl"
    lines = [{"reference": "ref.png", "prompt": f"{name} {i}", "seed": i} for i in range(rows)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def _submit(settings: Settings, folder: Path, name: str, *, rows: int = 1, lane: str = "bulk") -> str:
    manifest = _manifest(folder, name, rows)
    return submit_manifest(
        settings=settings, path=manifest, batch_name=name, model_set_name=MODEL_SET, lane=lane
    ).batch_id


def _dispatch(dispatcher: Dispatcher) -> int:
    """One round on a fresh read of SQL (the test decides when new work is seen, not a timer)."""
    dispatcher.rescan()
    return dispatcher.dispatch_once()


def _waiting(client: redis.Redis) -> list[JobMessage]:
    """Every waiting message's job, in the order workers take them (from the right)."""
    items: list[bytes] = client.lrange(QUEUE, 0, -1)  # type: ignore[assignment]
    return [decode_render_envelope(item) for item in reversed(items)]


def _taken_in_order(client: redis.Redis) -> list[tuple[str, int]]:
    """(batch id, seed: the manifest row) of every waiting message, in the order workers take them."""
    return [(m.batch_id, int(m.spec.params.seed)) for m in _waiting(client)]


def test_an_interactive_job_goes_ahead_of_the_bulk_messages_already_waiting(
    front_settings: Settings, tmp_path: Path, dispatcher: Dispatcher, client: redis.Redis
) -> None:
    bulk = _submit(front_settings, tmp_path, "bulk", rows=6)
    assert _dispatch(dispatcher) == 6
    urgent = _submit(front_settings, tmp_path, "urgent", lane="interactive")
    assert _dispatch(dispatcher) == 1
    assert _taken_in_order(client) == [(urgent, 0)] + [(bulk, i) for i in range(6)]
    # Its job is marked as present in Redis like any other (the reconciler's mirror).
    queued = client.smembers(front_settings.redis_prefix + keys.QUEUED_SET)
    assert {m.job_id.encode() for m in _waiting(client)} == queued


def test_interactive_jobs_pushed_in_separate_rounds_start_in_their_order(
    front_settings: Settings, tmp_path: Path, dispatcher: Dispatcher, client: redis.Redis
) -> None:
    bulk = _submit(front_settings, tmp_path, "bulk", rows=3)
    first = _submit(front_settings, tmp_path, "first", lane="interactive")
    assert _dispatch(dispatcher) == 4
    second = _submit(front_settings, tmp_path, "second", lane="interactive")
    third = _submit(front_settings, tmp_path, "third", lane="interactive", rows=2)
    assert _dispatch(dispatcher) == 3
    assert _taken_in_order(client) == [
        (first, 0),
        (second, 0),
        (third, 0),
        (third, 1),
        *[(bulk, i) for i in range(3)],
    ]
    # Once the interactive messages are taken, the next one goes straight to the consumer end.
    for _ in range(4):
        client.rpop(QUEUE)
    fourth = _submit(front_settings, tmp_path, "fourth", lane="interactive")
    assert _dispatch(dispatcher) == 1
    assert _taken_in_order(client) == [(fourth, 0), *[(bulk, i) for i in range(3)]]


def test_an_ipab_submit_of_an_interactive_job_wakes_a_dispatcher_that_no_timer_would_wake(
    front_settings: Settings,
    tmp_path: Path,
    dispatcher: Dispatcher,
    client: redis.Redis,
    settings_env: Callable[[Settings], dict[str, str]],
    no_burst_limit: None,
) -> None:
    assert dispatcher.dispatch_once() == 0  # nothing queued: the backlog is read once, empty
    signals = [signal_key(front_settings.redis_prefix, MODEL_SET)]
    client.delete(*signals)
    prefix, model_sets = front_settings.redis_prefix, [MODEL_SET]
    assert not wait_for_signal(redis_client=client, prefix=prefix, model_sets=model_sets, timeout_s=0.01)

    env = {k: v for k, v in os.environ.items() if not k.startswith("IPAB_")} | settings_env(front_settings)
    command = [sys.executable, "-m", "ipab.cli", "submit", str(_manifest(tmp_path, "cli", 1)), "--batch", "cli"]
    command += ["--lane", "interactive", "--model-set", MODEL_SET]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    batch_id = done.stdout.strip().splitlines()[-1]

    # The submission bumped the wake counter and left the signal a sleeping dispatcher blocks on.
    assert client.get(wake_key(front_settings, MODEL_SET)) == b"1"
    assert wait_for_signal(redis_client=client, prefix=prefix, model_sets=model_sets, timeout_s=5.0)
    # The next round re-reads SQL because of the wake (its re-read timer is a minute away).
    assert dispatcher.dispatch_once() == 1
    assert _taken_in_order(client) == [(batch_id, 0)]


def test_without_a_wake_the_dispatcher_does_not_see_new_work_until_its_timer(
    front_settings: Settings, tmp_path: Path, dispatcher: Dispatcher, client: redis.Redis, no_burst_limit: None
) -> None:
    # The control for the test above: the same job, its wake undone, is not read.
    assert dispatcher.dispatch_once() == 0
    _submit(front_settings, tmp_path, "unwoken", lane="interactive")
    client.delete(wake_key(front_settings, MODEL_SET))
    assert dispatcher.dispatch_once() == 0
    client.incr(wake_key(front_settings, MODEL_SET))
    assert dispatcher.dispatch_once() == 1
