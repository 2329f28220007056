"""Cached CLIP image embeddings: each reference image is encoded once across the fleet.

Three levels, read through and written back: an in-process LRU bounded in bytes, Redis
(safetensors bytes with a TTL) and a durable copy in object storage, so that a flushed
Redis costs one download, not one encode. On a full miss one worker takes a short Redis
lock and encodes; the others wait, bounded, for its result (single flight). Every entry
says what it is (image sha256, encoder, kind, dtype, shape, CRC-32 of its bytes); one
that does not match what was asked for is dropped with a warning and recomputed.

Redis and storage failures degrade the cache (that level is skipped, the call goes on and
counts the error); only the reference image and the encoder can fail a call.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import struct
import threading
import time
import uuid
import zlib
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Final, Protocol, runtime_checkable

import torch
from PIL import Image
from redis import Redis, RedisError
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from shared.cache_stats import CacheStats, record_fleet_stats
from shared.errors import InvalidInput, ModelSetError, ObjectMissing, SettingsError, StorageUnavailable
from shared.images import decode_reference
from shared.keys import EMBED_KEY, EMBED_LOCK_KEY, embedding_key
from shared.settings import Settings

log = logging.getLogger(__name__)

EMBED_RANKS: Final = {"image_embeds": 1, "hidden_states": 2}  # plain: (D,); plus: (tokens, hidden)
ENTRY_FORMAT: Final = "ipab-embedding-1"
TENSOR_NAME: Final = "embedding"
CONTENT_TYPE: Final = "application/octet-stream"
FIRST_POLL_S: Final = 0.005
MAX_POLL_S: Final = 0.1
_SAFE_TOKEN = re.compile(r"[A-Za-z0-9._-]{1,64}")
_UNLOCK_LUA: Final = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"

Loader = Callable[[], bytes]
Ref = tuple[str, Loader]  # (sha256 of the reference image bytes, returns those bytes)


@runtime_checkable
class Encoder(Protocol):
    """The image encoder the cache runs on a miss; `worker.pipeline.Renderer` is one."""

    @property
    def encoder_id(self) -> str:
        """Identity of the image encoder (a hash of its weights or config), stable across processes."""
        ...

    @property
    def embed_kind(self) -> str:
        """What `encode` returns: `image_embeds` (plain adapters) or `hidden_states` (plus)."""
        ...

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the tensors `encode` returns."""
        ...

    def encode(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """One CPU tensor per image: `(D,)` for image_embeds, `(tokens, hidden)` for hidden_states."""
        ...


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


@dataclass(frozen=True)
class EncoderIdentity:
    """What an embedding is keyed by besides the image: encoder, kind and dtype (and, if known, shape)."""

    encoder_id: str
    embed_kind: str
    dtype: torch.dtype
    embed_shape: tuple[int, ...] | None = None  # when the encoder knows it without loading weights

    def __post_init__(self) -> None:
        if self.embed_kind not in EMBED_RANKS:
            raise InvalidInput("embed_kind", self.embed_kind, f"must be one of {sorted(EMBED_RANKS)}")
        if not self.encoder_id:
            raise InvalidInput("encoder_id", self.encoder_id, "must identify the image encoder (not empty)")

    @classmethod
    def of(cls, encoder: Encoder) -> EncoderIdentity:
        """The identity an encoder announces (`embed_shape` is read when the encoder has one)."""
        shape = getattr(encoder, "embed_shape", None)
        return cls(encoder.encoder_id, encoder.embed_kind, encoder.dtype, tuple(shape) if shape else None)

    @property
    def dtype_name(self) -> str:
        """`float16`, `bfloat16`, ..."""
        return str(self.dtype).removeprefix("torch.")

    @property
    def token(self) -> str:
        """Path- and key-safe name of this identity: `<kind>-<dtype>-<encoder id or its hash>`."""
        encoder = self.encoder_id
        if not _SAFE_TOKEN.fullmatch(encoder):
            encoder = hashlib.sha256(encoder.encode()).hexdigest()[:32]
        return f"{self.embed_kind}-{self.dtype_name}-{encoder}"

    def matches(self, other: EncoderIdentity) -> bool:
        """Whether two identities key the same entries (shape is not part of the key)."""
        return (self.encoder_id, self.embed_kind, self.dtype) == (other.encoder_id, other.embed_kind, other.dtype)


class CorruptEntry(Exception):
    """Raised when cached bytes are not a valid entry for the image and encoder asked for."""


def pack_entry(tensor: torch.Tensor, *, sha256: str, identity: EncoderIdentity) -> bytes:
    """Serialize one embedding as safetensors bytes that say what they hold."""
    tensor = tensor.contiguous()
    metadata = {
        "format": ENTRY_FORMAT,
        "sha256": sha256,
        "encoder": identity.encoder_id,
        "kind": identity.embed_kind,
        "dtype": identity.dtype_name,
        "shape": _shape_text(tensor.shape),
        "crc32": _crc32(tensor),
    }
    return save_safetensors({TENSOR_NAME: tensor}, metadata=metadata)


def unpack_entry(data: bytes, *, sha256: str, identity: EncoderIdentity) -> torch.Tensor:
    """The embedding in `data`, or `CorruptEntry` saying why it is not the one asked for."""
    metadata = _read_metadata(data)
    wanted = {
        "format": ENTRY_FORMAT,
        "sha256": sha256,
        "encoder": identity.encoder_id,
        "kind": identity.embed_kind,
        "dtype": identity.dtype_name,
    }
    for name, want in wanted.items():
        if metadata.get(name) != want:
            raise CorruptEntry(f"metadata {name} is {metadata.get(name)!r}, expected {want!r}")
    try:
        tensor = load_safetensors(data)[TENSOR_NAME]
    except (SafetensorError, KeyError, ValueError, RuntimeError) as e:
        raise CorruptEntry(f"unreadable safetensors: {e}") from None
    _check_tensor(tensor, metadata, identity)
    return tensor


def _check_tensor(tensor: torch.Tensor, metadata: Mapping[str, str], identity: EncoderIdentity) -> None:
    if tensor.dtype != identity.dtype:
        raise CorruptEntry(f"dtype is {tensor.dtype}, expected {identity.dtype}")
    if tensor.dim() != EMBED_RANKS[identity.embed_kind]:
        raise CorruptEntry(f"shape {tuple(tensor.shape)} has the wrong rank for {identity.embed_kind}")
    if _shape_text(tensor.shape) != metadata.get("shape"):
        raise CorruptEntry(f"shape {tuple(tensor.shape)} differs from metadata shape {metadata.get('shape')!r}")
    if _crc32(tensor) != metadata.get("crc32"):
        raise CorruptEntry("CRC-32 mismatch (the tensor bytes changed)")


def _read_metadata(data: bytes) -> dict[str, str]:
    if len(data) < 8:
        raise CorruptEntry(f"{len(data)} bytes, shorter than a safetensors header")
    (header_len,) = struct.unpack("<Q", data[:8])
    if header_len > len(data) - 8:
        raise CorruptEntry(f"header length {header_len} runs past the end ({len(data)} bytes)")
    try:
        header = json.loads(data[8 : 8 + header_len])
    except ValueError:
        raise CorruptEntry("header is not JSON") from None
    metadata = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise CorruptEntry("no metadata in the header")
    return {str(k): str(v) for k, v in metadata.items()}


def private_copy(tensor: torch.Tensor) -> torch.Tensor:
    """A copy the caller owns, made by one memcpy on this thread.

    Not `clone()`: torch copies a 658 KB plus entry in parallel, and waking its idle thread
    pool costs milliseconds on a busy machine (measured: 4-16 ms p50 for an LRU hit).
    """
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().copy()
    return torch.from_numpy(raw).view(tensor.dtype).reshape(tensor.shape)


def _shape_text(shape: Sequence[int]) -> str:
    return "x".join(str(n) for n in shape)


def _crc32(tensor: torch.Tensor) -> str:
    # Against accidental damage (bit flips, bad writes), not forgery: whoever can write Redis
    # can write a well-formed entry. CRC-32 is ~6x faster than blake2b on a 658 KB plus entry.
    raw = tensor.contiguous().reshape(-1).view(torch.uint8).numpy()
    return f"{zlib.crc32(raw.data):08x}"


class ByteLru:
    """In-process LRU of tensors bounded by their total size in bytes; safe across threads."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes_used = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, key: str) -> torch.Tensor | None:
        """The tensor under `key` (now the most recently used), or None."""
        with self._lock:
            tensor = self._entries.get(key)
            if tensor is not None:
                self._entries.move_to_end(key)
            return tensor

    def put(self, key: str, tensor: torch.Tensor) -> None:
        """Keep `tensor`, evicting the least recently used until the bound holds; too big: not kept."""
        size_bytes = tensor.numel() * tensor.element_size()
        with self._lock:
            self._discard(key)
            if size_bytes > self.max_bytes:
                return
            self._entries[key] = tensor
            self.bytes_used += size_bytes
            while self.bytes_used > self.max_bytes:
                self._discard(next(iter(self._entries)))

    def clear(self) -> None:
        """Forget every entry."""
        with self._lock:
            self._entries.clear()
            self.bytes_used = 0

    def _discard(self, key: str) -> None:
        old = self._entries.pop(key, None)
        if old is not None:
            self.bytes_used -= old.numel() * old.element_size()


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
        self._encoder, self._factory, self.identity = _split_encoder(encoder, identity)
        self._prefix = prefix
        self._redis_ttl_s = redis_ttl_s
        self._lock_ttl_ms = max(1, round(lock_ttl_s * 1000))
        self._wait_s = wait_s
        self.lru = ByteLru(lru_bytes)
        self._shape = self.identity.embed_shape
        self._shape_trusted = self._shape is not None
        self._unlock = redis.register_script(_UNLOCK_LUA)
        self._redis_failing = False

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
        return self._encoder is not None

    def get(self, refs: Sequence[Ref]) -> tuple[list[torch.Tensor], CacheStats]:
        """One embedding per `(sha256, loader)` ref, in order, and what this call cost.

        A loader is called only when its image must be encoded. Raises `InvalidInput` when a
        reference cannot be decoded or does not hash to its sha256; encoder errors propagate.
        """
        stats = CacheStats()
        found = self._fetch(dict(refs), stats, use_lru=True)
        record_fleet_stats(self._redis, prefix=self._prefix, stats=stats)
        # Callers own what they get: an in-place change must not reach the LRU's copy.
        return [private_copy(found[sha]) for sha, _ in refs], stats

    def warm(self, refs: Sequence[Ref]) -> CacheStats:
        """Make sure the fleet finds every ref in Redis (from storage, or encoded when missing); the `embed` task.

        Skips this process's LRU, which says nothing about Redis. Raises as `get` does.
        """
        stats = CacheStats()
        self._fetch(dict(refs), stats, use_lru=False)
        record_fleet_stats(self._redis, prefix=self._prefix, stats=stats)
        return stats

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
            found |= self._single_flight(missing, stats)
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
            self._redis_ok()
        except RedisError as e:
            self._redis_failed(e, stats)
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
            try:
                data = self._store.get(self.object_key(sha))
            except ObjectMissing:
                data = None
            except StorageUnavailable as e:
                stats.store_errors += 1
                log.warning("embedding cache: object storage unavailable, reading on without it: %s", e)
                data = None
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

    def _delete_object(self, sha: str, stats: CacheStats) -> None:
        try:
            self._store.delete(self.object_key(sha))
        except StorageUnavailable as e:  # the encode that follows overwrites it anyway
            stats.store_errors += 1
            log.warning("embedding cache: corrupt durable copy of %s not deleted: %s", sha, e)

    def _unpack(self, data: bytes, sha: str, level: str, stats: CacheStats) -> torch.Tensor | None:
        try:
            tensor = unpack_entry(data, sha256=sha, identity=self.identity)
            self._check_shape(tuple(tensor.shape))
        except CorruptEntry as e:
            stats.corrupt += 1
            log.warning("embedding cache: dropping a corrupt %s entry %s: %s", level, self.object_key(sha), e)
            return None
        return tensor

    def _check_shape(self, shape: tuple[int, ...]) -> None:
        if self._shape is None:
            self._shape = shape  # provisional until this process encodes
        elif shape != self._shape:
            raise CorruptEntry(f"shape {shape} differs from this encoder's {self._shape}")

    def _learn_shape(self, shape: tuple[int, ...]) -> None:
        """The encoder's output is the truth; entries kept under another shape are dropped."""
        if self._shape is not None and shape != self._shape and self._shape_trusted:
            raise ModelSetError(f"the image encoder returned shape {shape}, where it announced or gave {self._shape}")
        if self._shape is not None and shape != self._shape:
            log.warning("embedding cache: entries of shape %s were wrong; clearing this process's LRU", self._shape)
            self.lru.clear()
        self._shape, self._shape_trusted = shape, True

    def _write_redis(self, sha: str, data: bytes, stats: CacheStats) -> None:
        try:
            self._redis.set(self.entry_key(sha), data, ex=self._redis_ttl_s)
            self._redis_ok()
        except RedisError as e:
            self._redis_failed(e, stats)

    def _delete_redis(self, sha: str, stats: CacheStats) -> None:
        try:
            self._redis.delete(self.entry_key(sha))
        except RedisError as e:
            self._redis_failed(e, stats)

    def _redis_failed(self, error: RedisError, stats: CacheStats) -> None:
        stats.redis_errors += 1
        if not self._redis_failing:  # one warning per outage, not one per call
            log.warning("embedding cache: Redis failing, going on without that level: %s", error)
        self._redis_failing = True

    def _redis_ok(self) -> None:
        if self._redis_failing:
            log.info("embedding cache: Redis is back")
        self._redis_failing = False

    # --- single flight -----------------------------------------------------------------------

    def _single_flight(self, missing: dict[str, Loader], stats: CacheStats) -> dict[str, torch.Tensor]:
        """Encode what nobody else is encoding; wait (up to `wait_s`) for what others are."""
        found: dict[str, torch.Tensor] = {}
        pending = dict(missing)
        deadline = time.monotonic() + self._wait_s
        delay_s = FIRST_POLL_S
        while pending:
            # 1. Take the free locks (a dead holder's lock frees itself at its TTL) and encode those.
            found |= self._encode_unclaimed(pending, stats)
            # 2. The rest is being encoded elsewhere: collect what has been published since.
            found |= self._read_redis([sha for sha in pending if sha not in found], stats)
            stats.waited += sum(1 for sha in pending if sha in found)
            pending = {sha: loader for sha, loader in pending.items() if sha not in found}
            if not pending:
                break
            # 3. Bounded: past `wait_s`, encode here rather than fail the job.
            if time.monotonic() >= deadline:
                log.warning("embedding cache: waited %.1f s for another worker's encode; encoding here", self._wait_s)
                found |= self._encode_and_publish(pending, stats)
                break
            time.sleep(delay_s)
            stats.wait_s += delay_s
            delay_s = min(2 * delay_s, MAX_POLL_S)
        return found

    def _encode_unclaimed(self, pending: dict[str, Loader], stats: CacheStats) -> dict[str, torch.Tensor]:
        tokens = self._take_locks(list(pending), stats)
        if not tokens:
            return {}
        try:
            # Another worker may have published and unlocked between our miss and our lock.
            found = self._read_redis(list(tokens), stats)
            stats.waited += len(found)
            found |= self._encode_and_publish({sha: pending[sha] for sha in tokens if sha not in found}, stats)
        finally:
            self._release_locks(tokens)
        return found

    def _take_locks(self, shas: list[str], stats: CacheStats) -> dict[str, str]:
        """sha -> lock token for each lock taken; without Redis every lock counts as taken (token "")."""
        token = uuid.uuid4().hex
        pipe = self._redis.pipeline(transaction=False)
        for sha in shas:
            pipe.set(self.lock_key(sha), token, nx=True, px=self._lock_ttl_ms)
        try:
            taken = pipe.execute()
            self._redis_ok()
        except RedisError as e:
            self._redis_failed(e, stats)
            return dict.fromkeys(shas, "")
        return {sha: token for sha, ok in zip(shas, taken, strict=True) if ok}

    def _release_locks(self, tokens: dict[str, str]) -> None:
        for sha, token in tokens.items():
            if not token:
                continue
            try:  # only our own lock: after our TTL it may be someone else's
                self._unlock(keys=[self.lock_key(sha)], args=[token])
            except RedisError as e:
                log.debug("embedding cache: lock for %s not released (it expires): %s", sha, e)

    def _encode_and_publish(self, todo: dict[str, Loader], stats: CacheStats) -> dict[str, torch.Tensor]:
        if not todo:
            return {}
        shas = list(todo)
        images = [_load_image(sha, todo[sha]) for sha in shas]
        encoder = self._loaded_encoder()
        started_s = time.perf_counter()
        outputs = encoder.encode(images)
        stats.encode_s += time.perf_counter() - started_s
        stats.encodes += len(shas)
        tensors = self._checked_outputs(outputs, len(shas))
        for sha, tensor in zip(shas, tensors, strict=True):
            self._publish(sha, tensor, stats)
        return dict(zip(shas, tensors, strict=True))

    def _loaded_encoder(self) -> Encoder:
        if self._encoder is None:
            assert self._factory is not None
            encoder = self._factory()
            if not EncoderIdentity.of(encoder).matches(self.identity):
                raise ModelSetError(
                    f"the encoder factory built {EncoderIdentity.of(encoder)}, but the cache is keyed by "
                    f"{self.identity}; pass the identity of the encoder the factory builds"
                )
            self._encoder = encoder
        return self._encoder

    def _checked_outputs(self, outputs: Sequence[torch.Tensor], count: int) -> list[torch.Tensor]:
        if len(outputs) != count:
            raise ModelSetError(f"the image encoder returned {len(outputs)} embeddings for {count} images")
        tensors = [t.detach().to("cpu", self.identity.dtype).contiguous() for t in outputs]
        rank = EMBED_RANKS[self.identity.embed_kind]
        for tensor in tensors:
            if tensor.dim() != rank:
                raise ModelSetError(
                    f"the image encoder returned shape {tuple(tensor.shape)} for {self.identity.embed_kind}"
                )
            self._learn_shape(tuple(tensor.shape))
        return tensors

    def _publish(self, sha: str, tensor: torch.Tensor, stats: CacheStats) -> None:
        """Durable copy first, then Redis (what waiting workers poll), then this process's LRU."""
        data = pack_entry(tensor, sha256=sha, identity=self.identity)
        metadata = {"sha256": sha, "encoder": self.identity.token, "shape": _shape_text(tensor.shape)}
        try:
            self._store.put(self.object_key(sha), data, metadata=metadata, content_type=CONTENT_TYPE)
        except StorageUnavailable as e:
            stats.store_errors += 1
            log.warning("embedding cache: durable copy of %s not written (a Redis flush will re-encode it): %s", sha, e)
        self._write_redis(sha, data, stats)
        self.lru.put(self.entry_key(sha), tensor)


def _split_encoder(
    encoder: Encoder | Callable[[], Encoder], identity: EncoderIdentity | None
) -> tuple[Encoder | None, Callable[[], Encoder] | None, EncoderIdentity]:
    """(encoder, None, its identity) or, for a factory, (None, factory, the identity given)."""
    if not isinstance(encoder, Encoder):
        if identity is None:
            raise InvalidInput("identity", None, "is needed when the encoder is a factory (the keys depend on it)")
        return None, encoder, identity
    own = EncoderIdentity.of(encoder)
    if identity is not None and not identity.matches(own):
        raise InvalidInput("identity", identity, f"differs from the encoder's own {own}; leave it out")
    return encoder, None, identity or own


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
