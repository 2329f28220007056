"""The embedding cache against a real Redis, with a fake encoder and a directory-backed store.

The fake encoder is deterministic (same image, same tensor) and counts its images in Redis,
so the counts hold across processes. The store is a directory so that spawned processes
share it; `tests/worker/test_embed_cache_integration.py` runs the same paths against SeaweedFS.
"""

from __future__ import annotations

import json
import logging
import uuid
from pathlib import Path

import pytest
import torch
from redis import Redis

from shared.cache_stats import CacheStats, read_fleet_stats, sum_stats_json
from shared.errors import InvalidInput, SettingsError
from tests.worker.conftest import (
    PLAIN_SHAPE,
    PLUS_SHAPE,
    DirStore,
    FakeEncoder,
    make_cache,
    png_bytes,
    ref,
    run_workers,
)
from worker.embedding import (
    ByteLru,
    EncoderIdentity,
    pack_entry,
    unpack_entry,
)
from worker.embedding import cache as embed_cache_module

# --- fixtures --------------------------------------------------------------------------------


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own (as a worker's `IPAB_REDIS_PREFIX`)."""
    return f"t{uuid.uuid4().hex[:10]}:"


@pytest.fixture
def client(redis_url: str) -> Redis:
    """A plain bytes client."""
    return Redis.from_url(redis_url)


@pytest.fixture
def store(tmp_path: Path) -> DirStore:
    """An empty directory-backed store."""
    return DirStore(tmp_path / "store")


def flush_prefix(client: Redis, prefix: str) -> None:
    """Forget every Redis key under `prefix`, as a Redis flush would."""
    keys = list(client.scan_iter(match=f"{prefix}*"))
    if keys:
        client.delete(*keys)


# --- levels and hits -------------------------------------------------------------------------


def test_second_get_of_an_image_is_an_lru_hit_without_encoding(redis_url: str, store: DirStore, prefix: str) -> None:
    encoder = FakeEncoder()
    cache = make_cache(redis_url, store, encoder, prefix)
    image = png_bytes(1)
    calls: list[str] = []

    (first,), stats1 = cache.get([ref(image, calls)])
    (second,), stats2 = cache.get([ref(image, calls)])

    assert (stats1.encodes, stats1.lru_misses, stats1.redis_misses, stats1.store_misses) == (1, 1, 1, 1)
    assert (stats2.encodes, stats2.lru_hits, stats2.redis_hits + stats2.store_hits) == (0, 1, 0)
    assert encoder.calls == 1 and len(calls) == 1
    assert torch.equal(first, second)


@pytest.mark.parametrize(
    ("kind", "dtype"),
    [("image_embeds", torch.float16), ("hidden_states", torch.bfloat16), ("image_embeds", torch.float32)],
)
def test_embeddings_from_every_level_equal_the_encoders_output_bit_for_bit(
    redis_url: str, store: DirStore, prefix: str, client: Redis, kind: str, dtype: torch.dtype
) -> None:
    encoder = FakeEncoder(kind=kind, dtype=dtype)
    images = [png_bytes(10), png_bytes(11)]
    want = [encoder.expected_for(data) for data in images]
    refs = [ref(data) for data in images]

    encoded, _ = make_cache(redis_url, store, encoder, prefix).get(refs)
    from_redis, redis_stats = make_cache(redis_url, store, encoder, prefix).get(refs)
    flush_prefix(client, prefix)
    from_store, store_stats = make_cache(redis_url, store, encoder, prefix).get(refs)

    assert redis_stats.redis_hits == 2 and store_stats.store_hits == 2 and encoder.calls == 2
    for got in (encoded, from_redis, from_store):
        assert [t.dtype for t in got] == [dtype, dtype]
        assert all(torch.equal(g, w) for g, w in zip(got, want, strict=True))


def test_results_come_back_in_the_order_of_the_refs_with_duplicates(
    redis_url: str, store: DirStore, prefix: str
) -> None:
    encoder = FakeEncoder()
    a, b = png_bytes(20), png_bytes(21)

    got, stats = make_cache(redis_url, store, encoder, prefix).get([ref(b), ref(a), ref(b)])

    assert stats.encodes == 2
    assert [torch.equal(g, encoder.expected_for(d)) for g, d in zip(got, [b, a, b], strict=True)] == [True] * 3


def test_changing_a_returned_tensor_does_not_change_the_cached_one(
    redis_url: str, store: DirStore, prefix: str
) -> None:
    encoder = FakeEncoder()
    cache = make_cache(redis_url, store, encoder, prefix)
    image = png_bytes(22)
    (first,), _ = cache.get([ref(image)])
    first.zero_()

    (again,), stats = cache.get([ref(image)])

    assert stats.lru_hits == 1 and torch.equal(again, encoder.expected_for(image))


def test_a_flushed_redis_costs_one_download_per_image_and_no_encode(
    redis_url: str, store: DirStore, prefix: str, client: Redis
) -> None:
    encoder = FakeEncoder()
    refs = [ref(png_bytes(30 + i)) for i in range(3)]
    make_cache(redis_url, store, encoder, prefix).get(refs)
    flush_prefix(client, prefix)

    _, after_flush = make_cache(redis_url, store, encoder, prefix).get(refs)
    _, next_worker = make_cache(redis_url, store, encoder, prefix).get(refs)

    assert (after_flush.encodes, after_flush.downloads, after_flush.redis_misses) == (0, 3, 3)
    assert (next_worker.encodes, next_worker.downloads, next_worker.redis_hits) == (0, 0, 3)  # refilled
    assert encoder.calls == 3


# --- LRU ---------------------------------------------------------------------------------------


def test_lru_is_bounded_in_bytes_and_evicts_the_least_recently_used() -> None:
    lru = ByteLru(max_bytes=3 * 64)  # three 16-float32 tensors
    for name in "abc":
        lru.put(name, torch.zeros(16))
    lru.get("a")  # now b is the least recently used
    lru.put("d", torch.zeros(16))

    assert [k for k in "abcd" if lru.get(k) is not None] == ["a", "c", "d"]
    assert lru.bytes_used == 3 * 64


def test_lru_keeps_no_tensor_bigger_than_its_bound() -> None:
    lru = ByteLru(max_bytes=100)
    lru.put("small", torch.zeros(8))
    lru.put("big", torch.zeros(64))

    assert lru.get("big") is None and lru.get("small") is not None and lru.bytes_used == 32


def test_cache_lru_evicts_by_bytes_and_evicted_images_come_back_from_redis(
    redis_url: str, store: DirStore, prefix: str
) -> None:
    encoder = FakeEncoder(dtype=torch.float32)  # 16 floats: 64 bytes each
    cache = make_cache(redis_url, store, encoder, prefix, lru_bytes=2 * 64)
    refs = [ref(png_bytes(40 + i)) for i in range(3)]
    cache.get(refs)

    (_, _, _), stats = cache.get(refs)

    assert cache.lru.bytes_used <= 2 * 64 and len(cache.lru) == 2
    assert stats.lru_hits + stats.redis_hits == 3 and stats.redis_hits >= 1 and stats.encodes == 0


# --- keys --------------------------------------------------------------------------------------


def test_plain_plus_and_each_dtype_get_separate_entries_for_the_same_image(
    redis_url: str, store: DirStore, prefix: str
) -> None:
    image = png_bytes(50)
    encoders = [
        FakeEncoder(kind="image_embeds", dtype=torch.float16),
        FakeEncoder(kind="hidden_states", dtype=torch.float16),
        FakeEncoder(kind="image_embeds", dtype=torch.bfloat16),
        FakeEncoder(kind="image_embeds", dtype=torch.float16, encoder_id="another-clip"),
    ]
    caches = [make_cache(redis_url, store, enc, prefix) for enc in encoders]

    results = [cache.get([ref(image)]) for cache in caches]

    assert [enc.calls for enc in encoders] == [1, 1, 1, 1]
    assert [stats.encodes for _, stats in results] == [1, 1, 1, 1]
    assert len({c.entry_key("x") for c in caches}) == 4 and len({c.object_key("x") for c in caches}) == 4
    assert tuple(results[1][0][0].shape) == PLUS_SHAPE and tuple(results[0][0][0].shape) == PLAIN_SHAPE
    assert caches[0].object_key("ab") == "embeddings/image_embeds-float16-fake-clip/ab.safetensors"


def test_an_encoder_id_unsafe_for_keys_is_hashed_into_the_token() -> None:
    identity = EncoderIdentity("org/CLIP ViT-bigG:1", "hidden_states", torch.float16)

    token = identity.token

    assert token.startswith("hidden_states-float16-") and "/" not in token and " " not in token


# --- integrity ---------------------------------------------------------------------------------


def _corruptions(good: bytes, other_image_entry: bytes) -> dict[str, bytes]:
    flipped = bytearray(good)
    flipped[-3] ^= 0xFF  # inside the tensor data: only the checksum notices
    return {
        "garbage": b"not a safetensors file at all",
        "truncated": good[: len(good) // 2],
        "flipped tensor byte": bytes(flipped),
        "another image's entry": other_image_entry,
        "empty": b"",
    }


CORRUPTIONS = ["garbage", "truncated", "flipped tensor byte", "another image's entry", "empty"]


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_redis_entry_is_dropped_with_a_warning_and_recomputed(
    redis_url: str, store: DirStore, prefix: str, client: Redis, caplog: pytest.LogCaptureFixture, corruption: str
) -> None:
    encoder = FakeEncoder()
    image, other = png_bytes(60), png_bytes(61)
    sha, load = ref(image)
    cache = make_cache(redis_url, store, encoder, prefix)
    cache.get([ref(image), ref(other)])
    good, other_entry = client.mget([cache.entry_key(sha), cache.entry_key(ref(other)[0])])
    assert isinstance(good, bytes) and isinstance(other_entry, bytes)
    client.set(cache.entry_key(sha), _corruptions(good, other_entry)[corruption])
    store.delete(cache.object_key(sha))  # nothing to fall back on: it must be encoded again

    with caplog.at_level(logging.WARNING, logger="worker.embedding"):
        (got,), stats = make_cache(redis_url, store, encoder, prefix).get([(sha, load)])

    assert torch.equal(got, encoder.expected_for(image))
    assert (stats.corrupt, stats.encodes) == (1, 1)
    assert any("corrupt redis entry" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    repaired = client.get(cache.entry_key(sha))
    assert isinstance(repaired, bytes) and torch.equal(unpack_entry(repaired, sha256=sha, identity=cache.identity), got)


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_a_corrupt_stored_object_is_dropped_with_a_warning_and_recomputed(
    redis_url: str, store: DirStore, prefix: str, client: Redis, caplog: pytest.LogCaptureFixture, corruption: str
) -> None:
    encoder = FakeEncoder()
    image, other = png_bytes(62), png_bytes(63)
    sha, load = ref(image)
    cache = make_cache(redis_url, store, encoder, prefix)
    cache.get([ref(image), ref(other)])
    good, other_entry = store.get(cache.object_key(sha)), store.get(cache.object_key(ref(other)[0]))
    store.put(cache.object_key(sha), _corruptions(good, other_entry)[corruption])
    flush_prefix(client, prefix)

    with caplog.at_level(logging.WARNING, logger="worker.embedding"):
        (got,), stats = make_cache(redis_url, store, encoder, prefix).get([(sha, load)])

    assert torch.equal(got, encoder.expected_for(image))
    assert (stats.corrupt, stats.encodes, stats.downloads) == (1, 1, 0)
    assert any("corrupt storage entry" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert torch.equal(unpack_entry(store.get(cache.object_key(sha)), sha256=sha, identity=cache.identity), got)


def test_an_entry_of_another_shape_than_the_encoder_gives_is_dropped_and_recomputed(
    redis_url: str, store: DirStore, prefix: str, client: Redis
) -> None:
    encoder = FakeEncoder()
    cache = make_cache(redis_url, store, encoder, prefix)
    cache.get([ref(png_bytes(64))])  # this process now knows the encoder's shape
    image = png_bytes(65)
    sha, load = ref(image)
    wrong = pack_entry(torch.zeros(PLAIN_SHAPE[0] * 2, dtype=torch.float16), sha256=sha, identity=cache.identity)
    client.set(cache.entry_key(sha), wrong)

    (got,), stats = cache.get([(sha, load)])

    assert torch.equal(got, encoder.expected_for(image)) and (stats.corrupt, stats.encodes) == (1, 1)


def test_an_announced_embed_shape_rejects_other_shapes_before_any_encode(
    redis_url: str, store: DirStore, prefix: str, client: Redis
) -> None:
    encoder = FakeEncoder()
    encoder.embed_shape = PLAIN_SHAPE  # type: ignore[attr-defined]
    cache = make_cache(redis_url, store, encoder, prefix)
    image = png_bytes(66)
    sha, load = ref(image)
    client.set(
        cache.entry_key(sha), pack_entry(torch.zeros(3, dtype=torch.float16), sha256=sha, identity=cache.identity)
    )

    (got,), stats = cache.get([(sha, load)])

    assert torch.equal(got, encoder.expected_for(image)) and stats.corrupt == 1


def test_reference_bytes_that_do_not_hash_to_their_sha256_are_refused_and_not_cached(
    redis_url: str, store: DirStore, prefix: str, client: Redis
) -> None:
    cache = make_cache(redis_url, store, FakeEncoder(), prefix)
    sha = ref(png_bytes(70))[0]

    with pytest.raises(InvalidInput, match="reference"):
        cache.get([(sha, lambda: png_bytes(71))])

    assert client.get(cache.entry_key(sha)) is None and not store.exists(cache.object_key(sha))
    assert client.get(cache.lock_key(sha)) is None  # the lock is released, not left to expire


def test_an_undecodable_reference_fails_the_call_and_releases_the_lock(
    redis_url: str, store: DirStore, prefix: str, client: Redis
) -> None:
    cache = make_cache(redis_url, store, FakeEncoder(), prefix)
    sha, load = ref(b"this is no image")

    with pytest.raises(InvalidInput, match="reference"):
        cache.get([(sha, load)])

    assert client.get(cache.lock_key(sha)) is None


# --- degraded levels ---------------------------------------------------------------------------


def test_an_unreachable_redis_degrades_to_the_other_levels_instead_of_failing(
    store: DirStore, prefix: str, tmp_path: Path
) -> None:
    encoder = FakeEncoder()
    dead = Redis.from_url(f"unix://{tmp_path}/nobody.sock", socket_connect_timeout=0.2)
    cache = make_cache("redis://unused", store, encoder, prefix, redis=dead)
    image = png_bytes(80)

    (first,), stats1 = cache.get([ref(image)])
    cache.lru.clear()
    (second,), stats2 = cache.get([ref(image)])

    assert torch.equal(first, encoder.expected_for(image)) and torch.equal(second, first)
    assert stats1.encodes == 1 and stats1.redis_errors >= 1
    assert (stats2.encodes, stats2.downloads) == (0, 1)


def test_unavailable_storage_degrades_to_encoding_and_is_counted(redis_url: str, store: DirStore, prefix: str) -> None:
    encoder = FakeEncoder()
    store.unavailable = True
    cache = make_cache(redis_url, store, encoder, prefix)
    image = png_bytes(81)

    (got,), stats = cache.get([ref(image)])

    assert torch.equal(got, encoder.expected_for(image))
    assert stats.encodes == 1 and stats.store_errors == 2  # the read and the durable write


# --- lazy encoder ------------------------------------------------------------------------------


def test_a_lazy_encoder_is_never_built_when_every_embedding_is_cached(
    redis_url: str, store: DirStore, prefix: str
) -> None:
    encoder = FakeEncoder()
    refs = [ref(png_bytes(90)), ref(png_bytes(91))]
    make_cache(redis_url, store, encoder, prefix).get(refs)
    built: list[FakeEncoder] = []

    def factory() -> FakeEncoder:
        built.append(FakeEncoder())
        return built[-1]

    lazy = make_cache(redis_url, store, factory, prefix, identity=EncoderIdentity.of(encoder))
    got, _ = lazy.get(refs)
    assert built == [] and not lazy.encoder_loaded and torch.equal(got[0], encoder.expected_for(png_bytes(90)))
    lazy.get([ref(png_bytes(92))])
    lazy.get([ref(png_bytes(93))])

    assert len(built) == 1 and built[0].calls == 2 and lazy.encoder_loaded


def test_a_lazy_encoder_needs_the_identity_it_will_have(redis_url: str, store: DirStore, prefix: str) -> None:
    with pytest.raises(InvalidInput, match="identity"):
        make_cache(redis_url, store, FakeEncoder, prefix)


def test_bad_limits_are_refused_naming_the_setting(redis_url: str, store: DirStore, prefix: str) -> None:
    with pytest.raises(SettingsError, match="IPAB_CACHE_LOCK_TTL_S"):
        make_cache(redis_url, store, FakeEncoder(), prefix, lock_ttl_s=0)


# --- warm and stats ----------------------------------------------------------------------------


def test_warm_fills_redis_and_storage_so_a_render_worker_never_encodes(
    redis_url: str, store: DirStore, prefix: str
) -> None:
    encoder = FakeEncoder()
    refs = [ref(png_bytes(100)), ref(png_bytes(101))]

    warmed = make_cache(redis_url, store, encoder, prefix).warm(refs)
    again = make_cache(redis_url, store, encoder, prefix).warm(refs)
    _, render = make_cache(redis_url, store, encoder, prefix).get(refs)

    assert (warmed.encodes, again.encodes, again.redis_hits, render.redis_hits, render.encodes) == (2, 0, 2, 2, 0)
    assert len(store.puts) == 2


def test_fleet_counters_add_up_every_call(redis_url: str, store: DirStore, prefix: str) -> None:
    cache = make_cache(redis_url, store, FakeEncoder(), prefix)
    refs = [ref(png_bytes(110)), ref(png_bytes(111))]
    _, one = cache.get(refs)
    fleet = read_fleet_stats(Redis.from_url(redis_url), prefix)
    assert (fleet["encodes"], fleet["lru_misses"], fleet["redis_misses"]) == (2, 2, 2)  # past the LRU: at once

    _, two = cache.get(refs)  # the LRU alone: counted with the next send, not by a round trip of its own
    assert read_fleet_stats(Redis.from_url(redis_url), prefix)["lru_hits"] == 0
    cache.send_fleet_stats()  # as the worker's shutdown does
    fleet = read_fleet_stats(Redis.from_url(redis_url), prefix)

    assert (fleet["encodes"], fleet["lru_hits"], fleet["lru_misses"], fleet["redis_misses"]) == (2, 2, 2, 2)
    assert fleet["encode_s"] == pytest.approx(one.encode_s + two.encode_s, abs=1e-6)


def test_calls_the_lru_served_alone_are_counted_within_a_second(
    redis_url: str, store: DirStore, prefix: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    cache = make_cache(redis_url, store, FakeEncoder(), prefix)
    refs = [ref(png_bytes(112))]
    cache.get(refs)
    cache.get(refs)
    cache.get(refs)
    assert read_fleet_stats(Redis.from_url(redis_url), prefix)["lru_hits"] == 0
    monkeypatch.setattr(embed_cache_module, "FLEET_STATS_EVERY_S", 0.0)  # a second later

    cache.get(refs)

    assert read_fleet_stats(Redis.from_url(redis_url), prefix)["lru_hits"] == 3


def test_cache_stats_survive_a_json_round_trip_and_sum() -> None:
    stats = CacheStats(lru_hits=2, encodes=1, encode_s=0.25, store_hits=3)
    total = CacheStats.from_json(stats.to_json())
    total.add(stats)

    assert total == CacheStats(lru_hits=4, encodes=2, encode_s=0.5, store_hits=6)
    assert stats.to_json()["downloads"] == 3


def test_the_counters_of_a_batchs_jobs_sum_into_one_record() -> None:
    jobs = [CacheStats(encodes=1, encode_s=0.25).to_json(), None, CacheStats(lru_hits=2, store_hits=1).to_json()]

    total = sum_stats_json(json.dumps(job) if job else None for job in jobs)

    assert total == CacheStats(encodes=1, encode_s=0.25, lru_hits=2, store_hits=1).to_json()
    assert total["downloads"] == 1 and sum_stats_json([None, ""]) == {}


def test_ipab_cache_stats_prints_the_fleet_counters(
    redis_url: str, store: DirStore, prefix: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import argparse

    from scheduler.cli import cache as embed_cache_cli

    make_cache(redis_url, store, FakeEncoder(), prefix).get([ref(png_bytes(120))])
    monkeypatch.setenv("IPAB_REDIS_URL", redis_url)
    monkeypatch.setenv("IPAB_REDIS_PREFIX", prefix)
    parser = argparse.ArgumentParser()
    embed_cache_cli.register(parser.add_subparsers())

    args = parser.parse_args(["cache", "stats", "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["encodes"] == 1
    args = parser.parse_args(["cache", "stats"])
    assert args.func(args) == 0
    assert "| redis hit rate | 0.0% |" in capsys.readouterr().out


# --- several processes -------------------------------------------------------------------------


@pytest.mark.slow
def test_workers_missing_on_the_same_image_together_encode_it_exactly_once(
    redis_url: str, tmp_path: Path, prefix: str, client: Redis
) -> None:
    data = png_bytes(130)

    results, exit_codes = run_workers(redis_url, str(tmp_path / "store"), prefix, data, count=3, doomed=False)

    assert exit_codes == [0, 0, 0]
    assert client.get(prefix + "encoded") == b"1"
    assert sorted(encodes for _, encodes, _ in results) == [0, 0, 1]
    assert all(equal for equal, _, _ in results)


@pytest.mark.slow
def test_a_worker_that_dies_holding_the_lock_blocks_the_others_only_until_the_lock_expires(
    redis_url: str, tmp_path: Path, prefix: str, client: Redis
) -> None:
    data = png_bytes(131)

    results, exit_codes = run_workers(redis_url, str(tmp_path / "store"), prefix, data, count=2, doomed=True)

    assert exit_codes == [0, 0, 17]  # the third died inside its encode, holding the lock
    assert client.get(prefix + "encoded") == b"2"  # the dead one's try, then exactly one more
    assert sorted(encodes for _, encodes, _ in results) == [0, 1]
    assert all(equal and wait_s > 0 for equal, _, wait_s in results)  # both were held up by the dead lock
