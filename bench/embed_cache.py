"""Embedding cache: hit latency per level (LRU, Redis, object storage) against the encode time.

- Levels: `EmbeddingCache.get` of one reference, timed end to end (lookups, safetensors
  decode and checks, write-back, the fleet counters' round trip), with the levels above
  emptied before each sample (not timed) and each sample checked to have hit that level.
  Entry sizes of the real adapters: plain `ip-adapter_sdxl` (1280 fp16, 2.5 KB) and plus
  ViT-H (257x1280 fp16, 658 KB); for those a stand-in encoder makes the tensors.
- Encode: a full miss (load and decode the reference, encode, publish to all levels) with
  the tiny random-weight Renderer on the CPU. Its encoder is tiny, so the ratio to a real
  ViT-bigG encode is far larger than shown here; the hit latencies do not depend on it.
- Encodes per batch: 200 jobs over 5 reference images on 2 caches (two workers), then again
  after a Redis flush (the durable copies are downloaded, nothing is encoded).

Private Redis and SeaweedFS on loopback. Goal: Redis-level hit p50 <= 2 ms.
Run alone: `python -m bench.embed_cache [--samples 200]`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Final

import numpy as np
import torch
from PIL import Image
from redis import Redis

from bench.common import Services, log, machine_info, private_services
from shared.cache_stats import CacheStats
from shared.storage import ObjectStore
from worker.embedding import EmbeddingCache, Encoder, Ref

REDIS_HIT_P50_GOAL_MS: Final = 2.0
LEVELS: Final = ("lru", "redis", "storage", "encode")
REAL_SHAPES: Final = {
    "plain ip-adapter_sdxl (1280 fp16)": ((1280,), "image_embeds"),
    "plus ViT-H (257x1280 fp16)": ((257, 1280), "hidden_states"),
}
BATCH_JOBS: Final = 200
BATCH_REFERENCES: Final = 5


class StandInEncoder:
    """Tensors of a real adapter's shape, drawn from the image's hash (the encode time means nothing)."""

    def __init__(self, shape: tuple[int, ...], kind: str) -> None:
        self.shape = shape
        self.embed_kind = kind
        self.encoder_id = f"bench-stand-in-{'x'.join(map(str, shape))}"
        self.dtype = torch.float16

    def encode(self, images: Sequence[Image.Image]) -> list[torch.Tensor]:
        """One tensor per image."""
        out = []
        for image in images:
            seed = int.from_bytes(hashlib.sha256(image.tobytes()).digest()[:8], "little")
            out.append(torch.randn(self.shape, generator=torch.Generator().manual_seed(seed)).half())
        return out


def _png(seed: int, size_px: int = 224) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size_px, size_px, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def _refs(count: int, *, first_seed: int) -> list[Ref]:
    refs: list[Ref] = []
    for i in range(count):
        data = _png(first_seed + i)
        refs.append((hashlib.sha256(data).hexdigest(), (lambda d=data: d)))  # type: ignore[misc]
    return refs


def _cache(svc: Services, store: ObjectStore, encoder: Encoder, prefix: str) -> EmbeddingCache:
    return EmbeddingCache(
        redis=Redis.from_url(svc.redis.url),
        store=store,
        encoder=encoder,
        prefix=prefix,
        lru_bytes=256 * 1024 * 1024,
        redis_ttl_s=3600,
        lock_ttl_s=60.0,
        wait_s=60.0,
    )


def _prepare(cache: EmbeddingCache, client: Redis, store: ObjectStore, ref: Ref, level: str) -> None:
    """Fill `level` and empty the levels above it for this image (not timed), so that `get` is served by `level`."""
    cache.get([ref])
    if level == "lru":
        return
    cache.lru.clear()
    if level in ("storage", "encode"):
        client.delete(cache.entry_key(ref[0]))
    if level == "encode":
        store.delete(cache.object_key(ref[0]))


HIT_CHECKS: Final[dict[str, Callable[[CacheStats], bool]]] = {
    "lru": lambda s: s.lru_hits == 1,
    "redis": lambda s: s.redis_hits == 1,
    "storage": lambda s: s.store_hits == 1,
    "encode": lambda s: s.encodes == 1,
}


def _time_get(cache: EmbeddingCache, client: Redis, store: ObjectStore, ref: Ref, level: str) -> float:
    """One `get` served by `level`, in ms (checked: a sample served elsewhere is an error)."""
    _prepare(cache, client, store, ref, level)
    started = time.perf_counter()
    _, stats = cache.get([ref])
    elapsed_ms = (time.perf_counter() - started) * 1000
    if not HIT_CHECKS[level](stats):
        raise RuntimeError(f"a {level} sample was not served by {level}: {stats.to_json()}")
    return elapsed_ms


def _time_raw_get(client: Redis, key: str) -> float:
    """The floor of a Redis hit: one plain GET of the same bytes, in ms."""
    started = time.perf_counter()
    client.get(key)
    return (time.perf_counter() - started) * 1000


def _levels(svc: Services, store: ObjectStore, encoder: Encoder, samples: int, *, prefix: str) -> dict[str, Any]:
    """Latency of each level for one encoder, and the size of its entries.

    `raw_get` is the floor of a Redis hit: a bare GET of the entry. The levels take turns
    sample by sample, so that a busy machine slows them all alike and
    the ratios hold; full misses (slow with a real encoder) every tenth round only.
    """
    client = Redis.from_url(svc.redis.url)
    cache = _cache(svc, store, encoder, prefix)
    refs = _refs(10, first_seed=int(hashlib.sha256(prefix.encode()).hexdigest()[:4], 16))
    cache.get(refs)  # every level filled
    times_ms: dict[str, list[float]] = {level: [] for level in (*LEVELS, "raw_get")}
    for i in range(samples):
        for level in LEVELS if i % 10 == 0 else LEVELS[:-1]:
            times_ms[level].append(_time_get(cache, client, store, refs[i % len(refs)], level))
        times_ms["raw_get"].append(_time_raw_get(client, cache.entry_key(refs[i % len(refs)][0])))
    figures: dict[str, Any] = {}
    for level, times in times_ms.items():
        p50, p95 = np.percentile(times, [50, 95])
        figures[level] = {"p50_ms": round(float(p50), 4), "p95_ms": round(float(p95), 4), "samples": len(times)}
    entry = client.get(cache.entry_key(refs[0][0]))
    figures["entry_bytes"] = len(entry) if isinstance(entry, bytes) else None
    figures["redis_p50_x_lru"] = round(figures["redis"]["p50_ms"] / figures["lru"]["p50_ms"], 1)
    figures["redis_p50_x_raw_get"] = round(figures["redis"]["p50_ms"] / figures["raw_get"]["p50_ms"], 1)
    figures["encode_p50_x_redis"] = round(figures["encode"]["p50_ms"] / figures["redis"]["p50_ms"], 1)
    return figures


def _batch(svc: Services, store: ObjectStore, encoder: Encoder) -> dict[str, int]:
    """Encodes and downloads for 200 jobs over 5 images on two caches, then again after a Redis flush."""
    refs = _refs(BATCH_REFERENCES, first_seed=90_000)
    figures: dict[str, int] = {"jobs": BATCH_JOBS, "references": BATCH_REFERENCES, "workers": 2}
    for run in ("first", "after_flush"):
        workers = [_cache(svc, store, encoder, "batch:") for _ in range(2)]
        total = CacheStats()
        for job in range(BATCH_JOBS):
            _, stats = workers[job % 2].get([refs[job % BATCH_REFERENCES]])
            total.add(stats)
        figures[f"{run}_encodes"], figures[f"{run}_downloads"] = total.encodes, total.downloads
        Redis.from_url(svc.redis.url).flushdb()
    return figures


def _tiny_renderer(folder: Path) -> tuple[Encoder | None, str]:
    """The tiny random-weight Renderer on the CPU, or None and why not."""
    try:
        from devkit.synth import write_tiny_model_set
        from shared.model_set import read_model_set
        from worker.pipeline import Renderer

        paths = write_tiny_model_set(folder)
        renderer = Renderer.load(read_model_set(paths["default"]), device="cpu", dtype="float32")
    except Exception as e:  # the benchmark still reports the hit levels
        return None, f"tiny Renderer unavailable ({type(e).__name__}: {e}); no encode figure from a real encoder"
    return renderer, "tiny random-weight Renderer, plain ip-adapter_sdxl layout, CPU float32"


def run(*, samples: int = 200) -> dict[str, Any]:
    """Hit latency per level and entry size, encode time on the tiny model, encodes per batch."""
    results: dict[str, Any] = {
        "machine": machine_info(),
        "samples": samples,
        "goal_redis_p50_ms": REDIS_HIT_P50_GOAL_MS,
        "load_avg_1m_before": os.getloadavg()[0],  # other work on the machine skews every figure
    }
    with private_services() as svc, tempfile.TemporaryDirectory(prefix="ipab-bench-models-") as models:
        store = ObjectStore(endpoint_url=svc.s3.url, bucket="ipab-bench-embed", region="us-east-1")
        store.ensure_bucket()
        levels: dict[str, Any] = {}
        for name, (shape, kind) in REAL_SHAPES.items():
            log(f"embed cache: levels for {name}")
            levels[name] = _levels(svc, store, StandInEncoder(shape, kind), samples, prefix=f"{kind}:")
        renderer, note = _tiny_renderer(Path(models))
        results["encoder"] = note
        if renderer is not None:
            log("embed cache: levels for the tiny Renderer")
            levels["tiny Renderer (encode on CPU)"] = _levels(svc, store, renderer, samples, prefix="tiny:")
        results["levels"] = levels
        results["batch"] = _batch(svc, store, renderer or StandInEncoder((1280,), "image_embeds"))
    results["load_avg_1m_after"] = os.getloadavg()[0]
    results["redis_p50_ok"] = all(v["redis"]["p50_ms"] <= REDIS_HIT_P50_GOAL_MS for v in levels.values())
    return results


def to_markdown(results: dict[str, Any]) -> str:
    """The figures as a markdown table (p50 / p95 in ms, one row per entry kind) and a line on the batch."""
    lines = [
        "| entry | bytes | bare GET (floor) | LRU hit | Redis hit | storage hit | full miss (encode) |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, f in results["levels"].items():
        cells = [f"{f[level]['p50_ms']:.3f} / {f[level]['p95_ms']:.3f}" for level in ("raw_get", *LEVELS)]
        lines.append(f"| {name} | {f['entry_bytes']} | " + " | ".join(cells) + " |")
    b = results["batch"]
    lines.append("")
    lines.append(
        f"{b['jobs']} jobs over {b['references']} reference images on {b['workers']} caches: "
        f"{b['first_encodes']} encodes, {b['first_downloads']} downloads; after a Redis flush: "
        f"{b['after_flush_encodes']} encodes, {b['after_flush_downloads']} downloads. "
        f"Redis-hit p50 goal <= {results['goal_redis_p50_ms']} ms: {'met' if results['redis_p50_ok'] else 'NOT met'}. "
        f"Encoder: {results['encoder']}. Load average (1 min) {results['load_avg_1m_before']:.1f} before, "
        f"{results['load_avg_1m_after']:.1f} after, on {results['machine']['cores']} cores."
    )
    return "\n".join(lines)


def main() -> None:
    """Command line: run the benchmark alone; print its figures as JSON, then as a markdown table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args()
    figures = run(samples=args.samples)
    print(json.dumps(figures, indent=2))
    print(to_markdown(figures))


if __name__ == "__main__":
    main()
