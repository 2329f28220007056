"""Counters of the embedding cache: per call (for a job's timings) and fleet-wide (a Redis hash).

Light on purpose (no torch): `ipab cache stats` and `ipab status` import it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from shared.keys import STATS_KEY

if TYPE_CHECKING:
    # Only types at import: `ipab status` sums a batch's counters (`sum_stats_json`) without Redis.
    import redis

log = logging.getLogger(__name__)

STATS_NAME: Final = "embed_cache"


@dataclass
class CacheStats:
    """What the embedding cache did for one call (or, summed, for a batch or the fleet)."""

    lru_hits: int = 0
    lru_misses: int = 0
    redis_hits: int = 0
    redis_misses: int = 0
    store_hits: int = 0  # each one a download of the durable copy
    store_misses: int = 0
    waited: int = 0  # entries another worker encoded while this one waited for them
    encodes: int = 0  # images this worker ran through the image encoder
    encode_s: float = 0.0
    wait_s: float = 0.0
    corrupt: int = 0  # entries found corrupt or mismatched, dropped and replaced
    redis_errors: int = 0  # Redis calls that failed; the cache went on without that level
    store_errors: int = 0  # object-storage calls that failed; likewise

    @property
    def downloads(self) -> int:
        """Embeddings fetched from object storage (a flushed Redis costs one each, not an encode)."""
        return self.store_hits

    def add(self, other: CacheStats) -> None:
        """Add `other`'s counters to these, in place."""
        for field in dataclasses.fields(self):
            setattr(self, field.name, getattr(self, field.name) + getattr(other, field.name))

    def to_json(self) -> dict[str, int | float]:
        """The counters as a JSON-ready dict (for a job's `timings`), `downloads` included."""
        out: dict[str, int | float] = dataclasses.asdict(self)
        out["encode_s"] = round(self.encode_s, 6)
        out["wait_s"] = round(self.wait_s, 6)
        out["downloads"] = self.downloads
        return out

    @classmethod
    def from_json(cls, data: Mapping[str, int | float]) -> CacheStats:
        """Rebuild counters from `to_json()` output; unknown keys (e.g. `downloads`) are ignored."""
        floats = {f.name: isinstance(f.default, float) for f in dataclasses.fields(cls)}
        stats = cls()
        for name, value in data.items():
            if name in floats:
                setattr(stats, name, float(value) if floats[name] else int(value))
        return stats


def sum_stats_json(texts: Iterable[str | None]) -> dict[str, int | float]:
    """Counters stored as `to_json()` text (one per job), summed into one `to_json()` dict; {} when there are none."""
    total: CacheStats | None = None
    for text in texts:
        if not text:
            continue
        total = total if total is not None else CacheStats()
        total.add(CacheStats.from_json(json.loads(text)))
    return total.to_json() if total is not None else {}


def fleet_stats_key(prefix: str) -> str:
    """The Redis hash holding the fleet-wide counters under `prefix`."""
    return prefix + STATS_KEY.format(name=STATS_NAME)


def record_fleet_stats(client: redis.Redis, *, prefix: str, stats: CacheStats) -> None:
    """Add one call's counters to the fleet-wide hash; a Redis failure only logs (counters are best effort)."""
    import redis  # loaded already by `client`'s own module: a dictionary look-up

    key = fleet_stats_key(prefix)
    pipe = client.pipeline(transaction=False)
    for name, value in dataclasses.asdict(stats).items():
        if isinstance(value, float) and value:
            pipe.hincrbyfloat(key, name, value)
        elif value:
            pipe.hincrby(key, name, value)
    if not len(pipe):
        return
    try:
        pipe.execute()
    except redis.RedisError as e:
        log.debug("fleet cache counters not recorded: %s", e)


def read_fleet_stats(client: redis.Redis, prefix: str) -> dict[str, int | float]:
    """The fleet-wide counters (every field of `CacheStats`, zero when never counted)."""
    raw = client.hgetall(fleet_stats_key(prefix))
    decoded = {_text(k): _text(v) for k, v in raw.items()}
    stats = CacheStats.from_json({k: float(v) for k, v in decoded.items()})
    return stats.to_json()


def format_stats_table(stats: Mapping[str, int | float]) -> str:
    """Counters as a two-column markdown table, hit rates per level first."""
    lines = ["| counter | value |", "| --- | --- |"]
    for level in ("lru", "redis", "store"):
        hits, misses = stats.get(f"{level}_hits", 0), stats.get(f"{level}_misses", 0)
        rate = f"{hits / (hits + misses):.1%}" if hits + misses else "-"
        lines.append(f"| {level} hit rate | {rate} |")
    lines += [f"| {name} | {value} |" for name, value in stats.items()]
    return "\n".join(lines)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value
