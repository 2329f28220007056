"""A small world for the janitor's tests: SQL rows, S3 objects and Redis keys as the real parts write them.

The `world` fixture serves this folder's tests; tests elsewhere (exports, reproduce) import `World` and
`world_on` for a world on their own database. `engine_events` listens to what an engine sends, for the
tests that count or explain the statements of a job's path."""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import pytest
import redis
from PIL import Image
from sqlalchemy import event, select, update
from sqlalchemy.orm import Session, sessionmaker

from shared import keys
from shared.db import (
    Batch,
    BatchReference,
    Job,
    JobStatus,
    ReferenceImage,
    ensure_database,
    make_engine,
    make_session_factory,
    new_id,
    utcnow,
)
from shared.janitor.loop import JanitorReport, janitor_pass
from shared.jobs import transaction
from shared.settings import Settings
from shared.spec import JobSpec, Reference, parse_params
from shared.storage import ObjectStore

ENCODER = "vit-h-plain"  # an image encoder's token, as `embeddings/<encoder>/` names it


def _png(color: tuple[int, int, int] = (40, 90, 200)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (8, 8), color).save(out, format="PNG")
    return out.getvalue()


PNG_BYTES = _png()  # every output: a real PNG (exports check its sha256, galleries decode it)


@dataclass
class World:
    """Sessions, store and Redis of one test, and helpers that write what the real parts write."""

    settings: Settings
    sessions: sessionmaker[Session]
    store: ObjectStore
    redis: redis.Redis
    images: dict[str, str] = field(default_factory=dict)  # name -> sha256

    def image(self, name: str) -> str:
        """A reference image stored under `refs/`, with an embedding in S3 and in Redis; its sha256."""
        if name not in self.images:
            data = _png((len(self.images) * 40 % 256, 7, 7))  # a real image, its own bytes
            sha = hashlib.sha256(data).hexdigest()
            self.store.put(keys.ref_key(sha, "png"), data)
            self.store.put(keys.embedding_key(ENCODER, sha), b"embedding")
            self.redis.set(self.settings.redis_prefix + keys.EMBED_KEY.format(cache_key=f"{ENCODER}:{sha}"), b"e")
            with transaction(self.sessions) as session:
                session.add(
                    ReferenceImage(
                        sha256=sha,
                        key=keys.ref_key(sha, "png"),
                        ext="png",
                        width=8,
                        height=8,
                        size_bytes=len(data),
                    )
                )
            self.images[name] = sha
        return self.images[name]

    def batch(
        self,
        name: str,
        *,
        jobs: int,
        images: Sequence[str] = ("a",),
        status: str = JobStatus.succeeded.value,
        attempts: int = 1,
        expires_after_s: int | None = 3600,
        tenant: str = "default",
    ) -> tuple[str, list[str]]:
        """A batch of finished jobs using `images`, each with its output object (its last attempt's);
        (batch id, job ids)."""
        shas = [self.image(n) for n in images]
        refs = tuple(Reference(sha256=s, key=keys.ref_key(s, "png")) for s in shas)
        spec = JobSpec(params=parse_params({"prompt": "p", "seed": 1}), references=refs).to_text()
        batch_id, job_ids = new_id(), [new_id() for _ in range(jobs)]
        now = utcnow()
        final = status not in ("queued", "running")
        attempts = attempts if final else 0
        expires_at = now + timedelta(seconds=expires_after_s) if final and expires_after_s is not None else None
        with transaction(self.sessions) as session:
            session.add(Batch(id=batch_id, name=name, model_set="m", job_count=jobs, tenant=tenant))
            session.flush()
            for line, job_id in enumerate(job_ids):
                output = keys.output_key(batch_id, job_id, attempts) if status == "succeeded" else None
                session.add(
                    Job(
                        id=job_id,
                        batch_id=batch_id,
                        line=line,
                        dedupe_key=f"k{line}",
                        spec=spec,
                        seed=line,
                        status=status,
                        attempts=attempts,
                        finished_at=now if final else None,
                        output_key=output,
                        output_bytes=len(PNG_BYTES) if output else None,
                        output_sha256=hashlib.sha256(PNG_BYTES).hexdigest() if output else None,
                        expires_after_s=expires_after_s,
                        expires_at=expires_at,
                    )
                )
            session.add_all(BatchReference(batch_id=batch_id, sha256=sha) for sha in shas)
        for job_id in job_ids:
            if status == "succeeded":
                self.store.put(keys.output_key(batch_id, job_id, attempts), PNG_BYTES)
        return batch_id, job_ids

    def expire(self, job_ids: Sequence[str], *, ago: timedelta = timedelta(seconds=5)) -> None:
        """Move the jobs' expiry into the past (as if their retention ran out)."""
        with transaction(self.sessions) as session:
            session.execute(update(Job).where(Job.id.in_(list(job_ids))).values(expires_at=utcnow() - ago))

    def sweep(self, passes: int = 1) -> list[JanitorReport]:
        """Janitor passes, as the loop runs them."""
        return [
            janitor_pass(sessions=self.sessions, store=self.store, redis_client=self.redis, settings=self.settings)
            for _ in range(passes)
        ]

    def job(self, job_id: str) -> Job | None:
        """The job's row as it is now."""
        with self.sessions() as session:
            return session.scalars(select(Job).where(Job.id == job_id)).one_or_none()

    def keys_under(self, prefix: str = "") -> list[str]:
        """Every object key under `prefix`."""
        return self.store.list_keys(prefix)


@contextmanager
def world_on(settings: Settings, database_url: str, store: ObjectStore, redis_url: str) -> Iterator[World]:
    """A world on the test's database (SQLite or PostgreSQL), bucket and Redis database."""
    settings = settings.model_copy(update={"database_url": database_url, "janitor_batch": 50})
    ensure_database(database_url)
    engine = make_engine(database_url)
    client = redis.Redis.from_url(redis_url, socket_timeout=10)
    try:
        yield World(settings, make_session_factory(engine), store, client)
    finally:
        client.close()
        engine.dispose()


@contextmanager
def engine_events(
    engine: Any, listeners: dict[str, Callable[..., Any]], *, retval: Sequence[str] = ()
) -> Iterator[None]:
    """`listeners` (event name: function) listen to `engine` while the block runs; those named in
    `retval` return what the event lets them change (SQLAlchemy's `retval=True`)."""
    for name, listener in listeners.items():
        event.listen(engine, name, listener, retval=name in retval)
    try:
        yield
    finally:
        for name, listener in listeners.items():
            event.remove(engine, name, listener)


def now_plus(seconds: float) -> datetime:
    """UTC now (naive, as stored) plus `seconds`."""
    return utcnow() + timedelta(seconds=seconds)


@pytest.fixture
def world(settings: Settings, database_url: str, object_store: ObjectStore, redis_url: str) -> Iterator[World]:
    """The test's world on SQLite and on PostgreSQL."""
    with world_on(settings, database_url, object_store, redis_url) as w:
        yield w
