"""One job's steps timed in-process, with the NullRenderer: where a worker's time goes per job.

The same calls the runner and publisher make, in the same order, each under its own clock:
claim (SQL), queued-set update (Redis), lease thread, message decode, embedding cache hit,
generate (null), PNG encode, S3 put, finish (SQL). Celery's own cost is what a worker
spends per job beyond the sum of these.
"""

from __future__ import annotations

import functools
import hashlib
import json
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from bench.common import sessions_for, write_manifest
from bench.null_model import NullRenderer
from shared import keys
from shared.db import Job
from shared.dispatch.wake import refill_level
from shared.jobs import JobResult, claim, finish_job
from shared.queue import forget_queued
from shared.settings import Settings
from shared.spec import parse_spec
from shared.storage import ObjectStore
from shared.wire import JobMessage, decode_message

STEP_JOBS: Final = 200
STEPS: Final = ("claim_sql", "forget_queued_redis", "lease_thread", "decode", "cache_hit", "generate_null")
STEPS_2: Final = ("png_encode", "s3_put", "finish_sql")


class _Clock:
    """Accumulates seconds per step name."""

    def __init__(self) -> None:
        self.total_s: dict[str, float] = {name: 0.0 for name in (*STEPS, *STEPS_2)}

    def time(self, name: str, fn: Callable[[], Any]) -> Any:
        t0 = time.perf_counter()
        value = fn()
        self.total_s[name] += time.perf_counter() - t0
        return value


def _messages(settings: Settings, refs: Sequence[Path]) -> list[JobMessage]:
    from scheduler.submission.submit import submit_manifest

    manifest = write_manifest(refs[0].parent / "steps.jsonl", refs, rows=STEP_JOBS, fields={"width": 64, "height": 64})
    batch_id = submit_manifest(
        settings=settings, path=manifest, batch_name="steps", model_set_name="bench-null"
    ).batch_id
    with sessions_for(settings)() as session:
        rows = session.execute(select(Job.id, Job.spec).where(Job.batch_id == batch_id)).all()
    return [JobMessage(job_id=i, batch_id=batch_id, spec=parse_spec(json.loads(s))) for i, s in rows]


@dataclass
class _Worker:
    """What a worker process holds, built here in-process."""

    settings: Settings
    sessions: sessionmaker[Session]
    redis: redis.Redis
    store: ObjectStore
    renderer: NullRenderer
    cache: Any
    host: str


def _loaders(w: _Worker, message: JobMessage) -> list[tuple[str, Callable[[], bytes]]]:
    return [(r.sha256, functools.partial(w.store.get, r.key)) for r in message.spec.references]


def _one_job(w: _Worker, m: JobMessage, clock: _Clock) -> None:
    from worker.lease import Lease
    from worker.png import encode_png

    raw = m.to_json()
    claimed = clock.time(
        "claim_sql",
        lambda: claim(sessions=w.sessions, job_id=m.job_id, worker_host=w.host, lease_s=60, max_attempts=3),
    )
    attempt = claimed.attempt
    prefix, name = w.settings.redis_prefix, w.renderer.name
    # As the runner does: the same round trip signals the dispatcher that the queue has room.
    clock.time(
        "forget_queued_redis",
        lambda: forget_queued(
            redis_client=w.redis,
            prefix=prefix,
            job_id=m.job_id,
            model_set=name,
            signal_at=refill_level(w.settings.dispatch_depth),
        ),
    )
    lease = clock.time(
        "lease_thread",
        lambda: Lease(
            sessions=w.sessions, job_id=m.job_id, attempt=attempt, lease_s=60, heartbeat_s=10, max_lease_s=3600
        ).start(claimed),
    )
    message = clock.time("decode", lambda: decode_message(raw))
    params = message.spec.params
    embeds, _ = clock.time("cache_hit", lambda: w.cache.get(_loaders(w, message)))
    image = clock.time("generate_null", lambda: w.renderer.generate(params, embeds, on_step=lease.check))
    png = clock.time("png_encode", lambda: encode_png(image, params=params, model_set=w.renderer.name))
    key = keys.output_key(m.batch_id, m.job_id, attempt)
    sha = hashlib.sha256(png).hexdigest()
    meta = {"job-id": m.job_id, "seed": str(params.seed), "sha256": sha}
    clock.time("s3_put", lambda: w.store.put(key, png, metadata=meta, content_type="image/png"))
    result = JobResult(output_key=key, output_sha256=sha, output_bytes=len(png), encode_s=0, denoise_s=0, upload_s=0)
    clock.time("finish_sql", lambda: finish_job(sessions=w.sessions, job_id=m.job_id, attempt=attempt, result=result))
    lease.stop()


def time_steps(settings: Settings, refs: Sequence[Path]) -> dict[str, float]:
    """Mean milliseconds per job of each step, over STEP_JOBS jobs run one after another in this process."""
    from worker.embedding import EmbeddingCache

    client = redis.Redis.from_url(settings.redis_url)
    store = ObjectStore.from_settings(settings)
    renderer = NullRenderer("bench-null")
    cache = EmbeddingCache.from_settings(settings, redis=client, store=store, encoder=renderer)
    w = _Worker(settings, sessions_for(settings), client, store, renderer, cache, socket.gethostname())
    messages = _messages(settings, refs)
    for m in messages[: len(refs)]:  # the first use of each reference encodes it: not a hit
        cache.get(_loaders(w, m))
    clock = _Clock()
    for m in messages:
        _one_job(w, m, clock)
    client.close()
    per_job = {name: 1000 * s / len(messages) for name, s in clock.total_s.items()}
    per_job["sum"] = sum(per_job.values())
    return per_job
