"""What a worker process builds once and every job uses: clients, the model, the cache."""

from __future__ import annotations

import logging
import socket
from dataclasses import dataclass

import redis
from sqlalchemy.orm import Session, sessionmaker

from shared.db import ensure_database, make_engine, make_session_factory
from shared.model_set import read_model_set
from shared.redis_conn import WORKER, connect_redis
from shared.settings import Settings, require_model_set
from shared.spec import DEFAULTS
from shared.storage import ObjectStore
from worker.embedding import EmbeddingCache
from worker.pipeline import Renderer
from worker.provenance import Provenance, model_set_hashes
from worker.publisher import Publisher

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    """Per-process state of a worker: built once, passed to every job."""

    settings: Settings
    sessions: sessionmaker[Session]
    redis: redis.Redis
    store: ObjectStore
    renderer: Renderer
    cache: EmbeddingCache
    publisher: Publisher
    host: str
    # What every output of this process is made with (weight sha256s, versions, device, dtype).
    provenance: Provenance | None = None

    def close(self) -> None:
        """Publish what is pending, count the cache's last calls, and let go of the clients."""
        self.publisher.close()
        self.cache.send_fleet_stats()
        self.redis.close()


def build_context(settings: Settings) -> WorkerContext:
    """Load the model set and connect to SQL, Redis and S3 (once per worker process)."""
    ensure_database(settings.database_url)
    sessions = make_session_factory(make_engine(settings.database_url))
    redis_client = connect_redis(settings.redis_url, profile=WORKER)
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket()
    renderer = Renderer.load(
        read_model_set(require_model_set(settings)),
        device=settings.device,
        dtype=settings.dtype,
        compile=settings.compile,
        encoder_device="cpu" if settings.encoder_placement in ("cpu", "swap") else None,
        fuse_qkv=settings.fuse_qkv,
        channels_last=settings.channels_last,
    )
    if settings.encoder_placement == "swap":
        renderer.encoder_swap_device = renderer.device
    if settings.compile:  # compile now, not during the first job
        renderer.warm_up(batch_sizes=[1, settings.batch_size], width=DEFAULTS["width"], height=DEFAULTS["height"])
    cache = EmbeddingCache.from_settings(settings, redis=redis_client, store=store, encoder=renderer)
    provenance = Provenance.of(renderer, hashes=model_set_hashes(renderer.config))
    log.info("worker ready: model set %s on %s", renderer.name, settings.device)
    return WorkerContext(
        settings=settings,
        sessions=sessions,
        redis=redis_client,
        store=store,
        renderer=renderer,
        cache=cache,
        publisher=Publisher(settings=settings, sessions=sessions, store=store),
        host=socket.gethostname(),
        provenance=provenance,
    )
