"""The worker tests' parts, imported by the tests of this folder: a fake renderer and a worker context on
real SQL, Redis and S3 around it, queued job rows; a fake image encoder, a folder store and embedding
caches, and worker processes (spawned: they import these parts as `tests.worker.conftest`) sharing one."""

from __future__ import annotations

import hashlib
import io
import json
import multiprocessing
import os
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis
import torch
from PIL import Image
from redis import Redis
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from scheduler.batches.actions import cancel
from shared import keys
from shared.db import Batch, Job, ensure_database, make_engine, make_session_factory
from shared.errors import ObjectMissing, StorageUnavailable
from shared.jobs import transaction
from shared.queue import enqueue_serialized
from shared.settings import Settings
from shared.spec import JobSpec, Reference, parse_params
from shared.storage import ObjectStore
from shared.wire import JobMessage
from worker.context import WorkerContext
from worker.embedding import EmbeddingCache, Encoder
from worker.publisher import Publisher
from worker.runner import run_job

# --- A fake renderer and a worker context ---------------------------------------------------------


def cancel_jobs(*, sessions: sessionmaker[Session], batch_id: str, job_ids: list[str] | None = None) -> int:
    """Cancel as `ipab cancel` does (the batch layer's action, in its own transaction); returns how many."""
    with transaction(sessions) as session:
        return len(cancel(session=session, batch_id=batch_id, job_ids=job_ids))


def encode_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


REF_PNG = encode_png(Image.new("RGB", (32, 32), (200, 30, 30)))


class FakeRenderer:
    """Renderer's interface; `generate` runs `steps` steps, calling on_step, then returns a flat image."""

    name = "fake"
    encoder_id = "fake-encoder"
    embed_kind = "image_embeds"
    dtype = torch.float32
    embed_shape = (4,)

    def __init__(self) -> None:
        self.fail_with: BaseException | None = None
        self.step_delay_s = 0.0

    def encode(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        return [torch.ones(4) for _ in images]

    def generate(
        self, params: Any, embeds: Sequence[torch.Tensor], *, on_step: Callable[[int], None] | None = None
    ) -> Image.Image:
        if self.fail_with is not None:
            raise self.fail_with
        for step in range(params.steps):
            time.sleep(self.step_delay_s)
            if on_step is not None:
                on_step(step)
        return Image.new("RGB", (params.width, params.height), (params.seed % 256, 0, 0))


def fake_context(settings: Settings, store: ObjectStore, renderer: FakeRenderer) -> WorkerContext:
    """A worker context on real SQL, Redis and S3 with a fake renderer (close it after)."""
    ensure_database(settings.database_url)
    sessions = make_session_factory(make_engine(settings.database_url))
    client = redis.Redis.from_url(settings.redis_url)
    cache = EmbeddingCache.from_settings(settings, redis=client, store=store, encoder=renderer)
    return WorkerContext(
        settings=settings,
        sessions=sessions,
        redis=client,
        store=store,
        renderer=renderer,  # type: ignore[arg-type]
        cache=cache,
        publisher=Publisher(settings=settings, sessions=sessions, store=store),
        host="test-host",
    )


def add_job(ctx: WorkerContext, *, steps: int = 2, seed: int = 7) -> JobMessage:
    """A committed, queued job row (as `ipab submit` leaves it) and its message."""
    sha = hashlib.sha256(REF_PNG).hexdigest()
    ref = Reference(sha256=sha, key=keys.ref_key(sha, "png"))
    ctx.store.put(ref.key, REF_PNG)
    params = parse_params({"prompt": "p", "seed": seed, "width": 64, "height": 64, "steps": steps})
    spec = JobSpec(params=params, references=(ref,))
    with ctx.sessions.begin() as session:
        batch = session.scalars(select(Batch).where(Batch.name == "b")).one_or_none()
        if batch is None:
            batch = Batch(name="b", model_set="fake")
            session.add(batch)
            session.flush()
        job_id = str(uuid.uuid4())
        session.add(
            Job(
                id=job_id,
                batch_id=batch.id,
                line=1,
                dedupe_key=job_id.replace("-", ""),
                spec=json.dumps(spec.to_json()),
                seed=seed,
            )
        )
    return JobMessage(job_id=job_id, batch_id=batch.id, spec=spec)


def job_row(ctx: WorkerContext, job_id: str) -> Job:
    with ctx.sessions() as session:
        return session.scalars(select(Job).where(Job.id == job_id)).one()


BATCH_SIZE = 4


class BatchingFakeRenderer(FakeRenderer):
    """The fake model with `generate_batch`; records the size of every pipeline call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []
        self.bad_seed: int | None = None  # a call holding this seed fails as a whole

    def generate(
        self, params: Any, embeds: Sequence[torch.Tensor], *, on_step: Callable[[int], None] | None = None
    ) -> Image.Image:
        image: Image.Image = self.generate_batch([(params, embeds)], on_step=on_step)[0]
        return image

    def generate_batch(self, items: Sequence[Any], *, on_step: Callable[[int], None] | None = None) -> list[Any]:
        self.calls.append(len(items))
        if self.bad_seed in {params.seed for params, _ in items}:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return [super(BatchingFakeRenderer, self).generate(p, e, on_step=on_step) for p, e in items]


def queue_messages(ctx: WorkerContext, messages: Sequence[JobMessage]) -> None:
    """Put messages on the worker's queue as the dispatcher does (oldest first out)."""
    queue = keys.render_queue(ctx.renderer.name)
    texts = [(m.job_id, m.to_text()) for m in messages]
    enqueue_serialized(redis_client=ctx.redis, queue=queue, messages=texts, prefix=ctx.settings.redis_prefix)


def run_published(ctx: WorkerContext, message: JobMessage) -> str:
    outcome = run_job(ctx, message.to_json())
    assert ctx.publisher.drain(timeout_s=30)
    return outcome


# --- A fake image encoder and embedding caches ----------------------------------------------------


PLAIN_SHAPE = (16,)
PLUS_SHAPE = (5, 8)


def png_bytes(seed: int, size_px: int = 24) -> bytes:
    """A small noise PNG, different for each seed."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size_px, size_px, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def ref(data: bytes, calls: list[str] | None = None) -> tuple[str, Callable[[], bytes]]:
    """A (sha256, loader) ref; the loader notes each call in `calls`."""
    sha = hashlib.sha256(data).hexdigest()

    def load() -> bytes:
        if calls is not None:
            calls.append(sha)
        return data

    return sha, load


class FakeEncoder:
    """Deterministic stand-in for the CLIP image encoder: a tensor drawn from the pixels' hash.

    Counts the images it encodes in `calls`, and in Redis when given a counter key, so that
    several processes can be counted together. `die_in_encode` exits the process mid-encode.
    """

    def __init__(
        self,
        *,
        kind: str = "image_embeds",
        dtype: torch.dtype = torch.float16,
        encoder_id: str = "fake-clip",
        redis_url: str | None = None,
        counter_key: str | None = None,
        encode_delay_s: float = 0.0,
        die_in_encode: bool = False,
    ) -> None:
        self.encoder_id = encoder_id
        self.embed_kind = kind
        self.dtype = dtype
        self.calls = 0
        self._counter = (Redis.from_url(redis_url), counter_key) if redis_url and counter_key else None
        self._delay_s = encode_delay_s
        self._die = die_in_encode

    def encode(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """One tensor per image, the same for the same pixels in every process."""
        if self._counter is not None:
            client, key = self._counter
            client.incrby(key, len(images))
        if self._die:
            os._exit(17)  # the lock holder dies without releasing anything
        if self._delay_s:
            import time

            time.sleep(self._delay_s)  # widen the window in which other workers miss too
        self.calls += len(images)
        return [self.expected(im) for im in images]

    def expected(self, image: Image.Image) -> torch.Tensor:
        """What `encode` returns for `image`."""
        seed = int.from_bytes(hashlib.sha256(image.tobytes()).digest()[:8], "little")
        shape = PLAIN_SHAPE if self.embed_kind == "image_embeds" else PLUS_SHAPE
        return torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(self.dtype)

    def expected_for(self, data: bytes) -> torch.Tensor:
        """What `encode` returns for the image in `data`."""
        return self.expected(Image.open(io.BytesIO(data)).convert("RGB"))


class DirStore:
    """The `ObjectStore` methods the cache uses, on a directory (shared by spawned processes)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.unavailable = False
        self.puts: list[str] = []

    def _path(self, key: str) -> Path:
        return self.root / key

    def _check(self) -> None:
        if self.unavailable:
            raise StorageUnavailable("object store at test unreachable")

    def get(self, key: str) -> bytes:
        """The bytes at `key`, `ObjectMissing` if none."""
        self._check()
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise ObjectMissing(f"s3://test/{key} does not exist") from None

    def put(self, key: str, data: bytes, *, metadata: dict[str, str] | None = None, content_type: str = "x") -> None:
        """Write `data` at `key`."""
        self._check()
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{uuid.uuid4().hex}.tmp")
        tmp.write_bytes(data)
        tmp.replace(path)
        self.puts.append(key)

    def delete(self, key: str) -> None:
        """Remove `key` if there."""
        self._check()
        self._path(key).unlink(missing_ok=True)

    def exists(self, key: str) -> bool:
        """Whether `key` is stored."""
        return self._path(key).exists()


def make_cache(
    redis_url: str, store: Any, encoder: Encoder | Callable[[], Encoder], prefix: str, **overrides: Any
) -> EmbeddingCache:
    """A cache with test-sized limits; `overrides` replaces any constructor argument."""
    args: dict[str, Any] = {
        "redis": Redis.from_url(redis_url),
        "store": store,
        "encoder": encoder,
        "prefix": prefix,
        "lru_bytes": 1 << 20,
        "redis_ttl_s": 600,
        "lock_ttl_s": 10.0,
        "wait_s": 30.0,
    }
    args.update(overrides)
    return EmbeddingCache(**args)


StoreSpec = str | tuple[str, str]  # a DirStore folder, or (S3 endpoint, bucket): picklable for spawn


def build_store(spec: StoreSpec) -> Any:
    """The store a spec names, built inside the process that uses it."""
    if isinstance(spec, str):
        return DirStore(Path(spec))
    from shared.storage import ObjectStore

    return ObjectStore(endpoint_url=spec[0], bucket=spec[1], region="us-east-1")


def _worker_get(
    redis_url: str,
    spec: StoreSpec,
    prefix: str,
    data: bytes,
    barrier: Any,
    die: bool,
    wait_for_lock: bool,
    results: Any,
) -> None:
    """One worker process: build a cache, wait for the others (and for a lock if told), get the embedding."""
    import time

    counter = prefix + "encoded"
    encoder = FakeEncoder(redis_url=redis_url, counter_key=counter, encode_delay_s=0.3, die_in_encode=die)
    cache = make_cache(redis_url, build_store(spec), encoder, prefix, lock_ttl_s=LOCK_TTL_S)
    sha = ref(data)[0]
    barrier.wait()
    while wait_for_lock and not Redis.from_url(redis_url).exists(cache.lock_key(sha)):
        time.sleep(0.01)  # start only once the doomed worker holds the lock
    (got,), stats = cache.get([ref(data)])
    results.put((torch.equal(got, encoder.expected_for(data)), stats.encodes, stats.wait_s))


LOCK_TTL_S = 3.0


def run_workers(
    redis_url: str, spec: StoreSpec, prefix: str, data: bytes, *, count: int, doomed: bool
) -> tuple[list[tuple[bool, int, float]], list[int | None]]:
    """Start `count` workers (plus one that dies holding the lock if `doomed`); their results and exit codes."""
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(count + doomed), ctx.Queue()
    roles = [(False, doomed)] * count + ([(True, False)] if doomed else [])
    procs = [
        ctx.Process(target=_worker_get, args=(redis_url, spec, prefix, data, barrier, die, wait, results))
        for die, wait in roles
    ]
    for p in procs:
        p.start()
    out = [results.get(timeout=120) for _ in range(count)]
    for p in procs:
        p.join(timeout=60)
    return out, [p.exitcode for p in procs]


@pytest.fixture
def ctx(settings: Settings, object_store: ObjectStore) -> Iterator[WorkerContext]:
    """A worker context on FakeRenderer (modules that need another renderer or settings define their own)."""
    context = fake_context(settings, object_store, FakeRenderer())
    yield context
    context.close()
