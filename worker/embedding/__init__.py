"""Cached CLIP image embeddings: each reference image is encoded once across the fleet.

One module per concern: `entry` (the bytes format and its checks), `memory` (the in-process
LRU), `single_flight` (the Redis lock and the wait), `encoder` (what the encoder is and
building it lazily), `redis_health` (degrading without Redis) and `cache` (the read-through
over the levels, `EmbeddingCache`).
"""

from worker.embedding.cache import DurableStore, EmbeddingCache, Loader, Ref
from worker.embedding.encoder import EMBED_RANKS, Encoder, EncoderIdentity
from worker.embedding.entry import CorruptEntry, pack_entry, unpack_entry
from worker.embedding.memory import ByteLru, private_copy

__all__ = [
    "EMBED_RANKS",
    "ByteLru",
    "CorruptEntry",
    "DurableStore",
    "EmbeddingCache",
    "Encoder",
    "EncoderIdentity",
    "Loader",
    "Ref",
    "pack_entry",
    "private_copy",
    "unpack_entry",
]
