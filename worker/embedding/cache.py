"""The embedding cache: each reference image's CLIP embedding read through three levels.

An in-process LRU bounded in bytes (`memory`), Redis (entry bytes with a TTL) and a durable
copy in object storage, so that a flushed Redis costs one download, not one encode. What is
found lower down is written back up. On a full miss one worker encodes (`single_flight`)
and publishes to every level. An entry that is not the one asked for (`entry`) is dropped
with a warning and recomputed.

Redis and storage failures degrade the cache (that level is skipped, the call goes on and
counts the error); only the reference image and the encoder can fail a call.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Final, Protocol

import torch
from PIL import Image
from redis import Redis, RedisError

from shared.cache_stats import CacheStats, record_fleet_stats
from shared.errors import InvalidInput, ObjectMissing, SettingsError, StorageUnavailable
from shared.images import decode_reference
from shared.keys import EMBED_KEY, EMBED_LOCK_KEY, embedding_key
from shared.settings import Settings
from worker import metrics
from worker.embedding.encoder import Encoder, EncoderIdentity, LazyEncoder
from worker.embedding.entry import CONTENT_TYPE, CorruptEntry, LearnedShape, pack_entry, shape_text, unpack_entry
from worker.embedding.memory import ByteLru, private_copy
from worker.embedding.redis_health import RedisHealth
from worker.embedding.single_flight import SingleFlight

log = logging.getLogger(__name__)

# Calls the LRU served alone add their counters to the fleet's hash at most this often: the
# round trip cost Redis a third of its CPU per job on a worker that reuses its references.
FLEET_STATS_EVERY_S: Final = 1.0

Loader = Callable[[], bytes]
Ref = tuple[str, Loader]  # (sha256 of the reference image bytes, returns those bytes)


class DurableStore(Protocol):
    """The part of `shared.storage.ObjectStore` the cache uses."""

    def get(self, key: str) -> bytes:
        """The object's bytes; raises `ObjectMissing` or `StorageUnavailable`."""
        ...

    def put(self, key: str, data: bytes, *, metadata: dict[str, str] | None = None, content_type: str) -> None:
        """Write the object (overwriting); raises `StorageUnavailable`."""
        ...

    def delete(self, key: str) -> None:
        """Remove the object (missing is fine); raises `StorageUnavailable`."""
        ...


class EmbeddingCache:
    """Embeddings of reference images, computed at most once across the fleet.

    Build one per worker process and use it from one thread at a time (only the LRU is locked).

    `encoder` may be a zero-argument factory: it is called on the first full miss only, so a
    worker whose embeddings are all cached never loads the image encoder. A factory needs
    `identity` (what the encoder will be), because the keys are built from it.
    """

    def __init__(
        self,
        *,
        redis: Redis,
        store: DurableStore,
        encoder: Encoder | Callable[[], Encoder],
        prefix: str,
        lru_bytes: int,
        redis_ttl_s: int,
        lock_ttl_s: float,
        wait_s: float,
        identity: EncoderIdentity | None = None,
    ) -> None:
        _check_limits(lru_bytes=lru_bytes, redis_ttl_s=redis_ttl_s, lock_ttl_s=lock_ttl_s, wait_s=wait_s)
        if redis.connection_pool.connection_kwargs.get("decode_responses"):
            raise SettingsError("the embedding cache needs a Redis client with decode_responses=False (bytes)")
        self._redis = redis
        self._store = store
        self._encoder = LazyEncoder(encoder, identity)
        self.identity = self._encoder.identity
        self._prefix = prefix
        self._redis_ttl_s = redis_ttl_s
        self.lru = ByteLru(lru_bytes)
        self._shape = LearnedShape(self.identity.embed_shape)
        self._health = RedisHealth()
        self._single_flight = SingleFlight(
            redis=redis, health=self._health, lock_key=self.lock_key, lock_ttl_s=lock_ttl_s, wait_s=wait_s
        )
        self._unsent = CacheStats()  # counters not yet in the fleet's hash
        self._sent_s = time.monotonic()
        self._unsent_lock = threading.Lock()

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        redis: Redis,
        store: DurableStore,
        encoder: Encoder | Callable[[], Encoder],
        identity: EncoderIdentity | None = None,
    ) -> EmbeddingCache:
        """A cache configured by the `IPAB_CACHE_*` settings and `IPAB_REDIS_PREFIX`."""
        return cls(
            redis=redis, store=store, encoder=encoder, identity=identity, prefix=settings.redis_prefix,
            lru_bytes=settings.cache_lru_bytes, redis_ttl_s=settings.cache_redis_ttl_s,
            lock_ttl_s=settings.cache_lock_ttl_s, wait_s=settings.cache_wait_s,
        )  # fmt: skip

    @property
    def encoder_loaded(self) -> bool:
        """Whether the image encoder has been built (a lazy one is built on the first full miss)."""
        return self._encoder.loaded

    def get(self, refs: Sequence[Ref]) -> tuple[list[torch.Tensor], CacheStats]:
        """One embedding per `(sha256, loader)` ref, in order, and what this call cost.

        A loader is called only when its image must be encoded. Raises `InvalidInput` when a
        reference cannot be decoded or does not hash to its sha256; encoder errors propagate.
        """
        stats = CacheStats()
        found = self._fetch(dict(refs), stats, use_lru=True)
        self._count(stats, lru_alone=not stats.lru_misses)
        metrics.cache_used(stats)
        # Callers own what they get: an in-place change must not reach the LRU's copy.
        return [private_copy(found[sha]) for sha, _ in refs], stats

    def warm(self, refs: Sequence[Ref]) -> CacheStats:
        """Make sure the fleet finds every ref in Redis (from storage, or encoded when missing).

        For pre-filling the cache ahead of a batch; no task or command calls it yet. Skips this
        process's LRU, which says nothing about Redis. Raises as `get` does.
        """
        stats = CacheStats()
        self._fetch(dict(refs), stats, use_lru=False)
        self._count(stats, lru_alone=False)
        return stats

    def _count(self, stats: CacheStats, *, lru_alone: bool) -> None:
        """Add a call's counters to the fleet's hash: at once when it went past the LRU (Redis was
        asked anyway), else with the next such call or FLEET_STATS_EVERY_S after the last send."""
        with self._unsent_lock:
            self._unsent.add(stats)
            if lru_alone and time.monotonic() - self._sent_s < FLEET_STATS_EVERY_S:
                return
        self.send_fleet_stats()

    def send_fleet_stats(self) -> None:
        """Add the counters not sent yet to the fleet's hash (a worker's shutdown sends its last)."""
        with self._unsent_lock:
            unsent, self._unsent, self._sent_s = self._unsent, CacheStats(), time.monotonic()
        record_fleet_stats(self._redis, prefix=self._prefix, stats=unsent)

    def entry_key(self, sha256: str) -> str:
        """The Redis key of one embedding."""
        return self._prefix + EMBED_KEY.format(cache_key=f"{self.identity.token}:{sha256}")

    def lock_key(self, sha256: str) -> str:
        """The Redis key of one embedding's single-flight lock."""
        return self._prefix + EMBED_LOCK_KEY.format(cache_key=f"{self.identity.token}:{sha256}")

    def object_key(self, sha256: str) -> str:
        """The object-storage key of one embedding's durable copy."""
        return embedding_key(self.identity.token, sha256)

    def _fetch(self, loaders: dict[str, Loader], stats: CacheStats, *, use_lru: bool) -> dict[str, torch.Tensor]:
        # 1. This process's LRU.
        found = self._from_lru(list(loaders), stats) if use_lru else {}
        # 2. Redis, all in one round trip.
        found |= self._from_redis([sha for sha in loaders if sha not in found], stats)
        # 3. The durable copies in object storage.
        found |= self._from_store([sha for sha in loaders if sha not in found], stats)
        # 4. Full misses: one worker of the fleet encodes each, the others wait for it.
        missing = {sha: loader for sha, loader in loaders.items() if sha not in found}
        if missing:
            found |= self._single_flight.run(missing, stats, read=self._read_redis, encode=self._encode_and_publish)
        return found

    # --- the levels ------------------------------------------------------------------------

    def _from_lru(self, shas: list[str], stats: CacheStats) -> dict[str, torch.Tensor]:
        found = {sha: t for sha in shas if (t := self.lru.get(self.entry_key(sha))) is not None}
        stats.lru_hits += len(found)
        stats.lru_misses += len(shas) - len(found)
        return found

    def _from_redis(self, shas: list[str], stats: CacheStats) -> dict[str, torch.Tensor]:
        found = self._read_redis(shas, stats)
        stats.redis_hits += len(found)
        stats.redis_misses += len(shas) - len(found)
        return found

    def _read_redis(self, shas: list[str], stats: CacheStats) -> dict[str, torch.Tensor]:
        """Valid Redis entries (kept in the LRU too); corrupt ones are deleted."""
        if not shas:
            return {}
        try:
            values = self._redis.mget([self.entry_key(sha) for sha in shas])
            self._health.ok()
        except RedisError as e:
            self._health.failed(e, stats)
            return {}
        found = {}
        for sha, data in zip(shas, values, strict=True):
            tensor = self._unpack(data, sha, "redis", stats) if isinstance(data, bytes) else None
            if tensor is not None:
                found[sha] = tensor
                self.lru.put(self.entry_key(sha), tensor)
            elif data is not None:
                self._delete_redis(sha, stats)
        return found

    def _from_store(self, shas: list[str], stats: CacheStats) -> dict[str, torch.Tensor]:
        """Durable copies, written back to Redis and the LRU; corrupt ones are deleted."""
        found = {}
        for sha in shas:
            data = self._read_store(sha, stats)
            tensor = self._unpack(data, sha, "storage", stats) if data is not None else None
            if data is None or tensor is None:
                stats.store_misses += 1
                if data is not None:
                    self._delete_object(sha, stats)
                continue
            stats.store_hits += 1
            found[sha] = tensor
            self._write_redis(sha, data, stats)
            self.lru.put(self.entry_key(sha), tensor)
        return found

    def _read_store(self, sha: str, stats: CacheStats) -> bytes | None:
        try:
            return self._store.get(self.object_key(sha))
        except ObjectMissing:
            return None
        except StorageUnavailable as e:
            stats.store_errors += 1
            log.warning("embedding cache: object storage unavailable, reading on without it: %s", e)
            return None

    def _delete_object(self, sha: str, stats: CacheStats) -> None:
        try:
            self._store.delete(self.object_key(sha))
        except StorageUnavailable as e:  # the encode that follows overwrites it anyway
            stats.store_errors += 1
            log.warning("embedding cache: corrupt durable copy of %s not deleted: %s", sha, e)

    def _unpack(self, data: bytes, sha: str, level: str, stats: CacheStats) -> torch.Tensor | None:
        try:
            tensor = unpack_entry(data, sha256=sha, identity=self.identity)
            self._shape.check(tuple(tensor.shape))
        except CorruptEntry as e:
            stats.corrupt += 1
            log.warning("embedding cache: dropping a corrupt %s entry %s: %s", level, self.object_key(sha), e)
            return None
        return tensor

    def _write_redis(self, sha: str, data: bytes, stats: CacheStats) -> None:
        try:
            self._redis.set(self.entry_key(sha), data, ex=self._redis_ttl_s)
            self._health.ok()
        except RedisError as e:
            self._health.failed(e, stats)

    def _delete_redis(self, sha: str, stats: CacheStats) -> None:
        try:
            self._redis.delete(self.entry_key(sha))
        except RedisError as e:
            self._health.failed(e, stats)

    # --- full misses -------------------------------------------------------------------------

    def _encode_and_publish(self, todo: dict[str, Loader], stats: CacheStats) -> dict[str, torch.Tensor]:
        if not todo:
            return {}
        shas = list(todo)
        images = [_load_image(sha, todo[sha]) for sha in shas]
        encoder = self._encoder.load()
        started_s = time.perf_counter()
        outputs = encoder.encode(images)
        stats.encode_s += time.perf_counter() - started_s
        stats.encodes += len(shas)
        tensors = self._encoder.checked(outputs, len(shas))
        for tensor in tensors:
            self._learn_shape(tuple(tensor.shape))
        for sha, tensor in zip(shas, tensors, strict=True):
            self._publish(sha, tensor, stats)
        return dict(zip(shas, tensors, strict=True))

    def _learn_shape(self, shape: tuple[int, ...]) -> None:
        """The encoder's output is the truth; entries kept under another shape are dropped."""
        wrong = self._shape.learn(shape)
        if wrong is not None:
            log.warning("embedding cache: entries of shape %s were wrong; clearing this process's LRU", wrong)
            self.lru.clear()

    def _publish(self, sha: str, tensor: torch.Tensor, stats: CacheStats) -> None:
        """Durable copy first, then Redis (what waiting workers poll), then this process's LRU."""
        data = pack_entry(tensor, sha256=sha, identity=self.identity)
        metadata = {"sha256": sha, "encoder": self.identity.token, "shape": shape_text(tensor.shape)}
        try:
            self._store.put(self.object_key(sha), data, metadata=metadata, content_type=CONTENT_TYPE)
        except StorageUnavailable as e:
            stats.store_errors += 1
            log.warning("embedding cache: durable copy of %s not written (a Redis flush will re-encode it): %s", sha, e)
        self._write_redis(sha, data, stats)
        self.lru.put(self.entry_key(sha), tensor)


def _load_image(sha: str, loader: Loader) -> Image.Image:
    data = loader()
    actual = hashlib.sha256(data).hexdigest()
    if actual != sha:
        # Caching this image's embedding under another image's key would poison every later job.
        raise InvalidInput("reference", sha, f"its bytes hash to {actual}; re-submit the reference image")
    return decode_reference(data, field="reference")


def _check_limits(*, lru_bytes: int, redis_ttl_s: int, lock_ttl_s: float, wait_s: float) -> None:
    checks = {
        "IPAB_CACHE_LRU_BYTES": (lru_bytes, lru_bytes >= 0, "must be >= 0 (0 turns the LRU off)"),
        "IPAB_CACHE_REDIS_TTL_S": (redis_ttl_s, redis_ttl_s > 0, "must be > 0 seconds"),
        "IPAB_CACHE_LOCK_TTL_S": (lock_ttl_s, lock_ttl_s > 0, "must be > 0 seconds (longer than one encode)"),
        "IPAB_CACHE_WAIT_S": (wait_s, wait_s >= 0, "must be >= 0 seconds"),
    }
    for name, (value, ok, rule) in checks.items():
        if not ok:
            raise SettingsError(f"{name} is {value!r}: {rule}")
