"""The embedding cache on the real parts: Redis, SeaweedFS (S3) and, where it loads, the tiny Renderer.

The fake encoder (from test_embed_cache) counts its work across processes; the Renderer
tests check that the cache hands the pipeline exactly what the image encoder gives.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from redis import Redis

from devkit.services import Service
from shared.spec import parse_params
from shared.storage import ObjectStore
from tests.worker.conftest import FakeEncoder, make_cache, png_bytes, ref, run_workers
from worker.embedding import unpack_entry


def test_the_durable_copy_is_a_safetensors_object_at_its_documented_key(
    redis_url: str, object_store: ObjectStore
) -> None:
    cache = make_cache(redis_url, object_store, FakeEncoder(), "p:")
    image = png_bytes(1)
    sha, load = ref(image)

    (got,), _ = cache.get([(sha, load)])

    key = f"embeddings/image_embeds-float16-fake-clip/{sha}.safetensors"
    assert object_store.head(key) == {"sha256": sha, "encoder": "image_embeds-float16-fake-clip", "shape": "16"}
    assert torch.equal(unpack_entry(object_store.get(key), sha256=sha, identity=cache.identity), got)


def test_a_flushed_redis_costs_one_download_per_image_and_no_encode(redis_url: str, object_store: ObjectStore) -> None:
    encoder = FakeEncoder()
    refs = [ref(png_bytes(10 + i)) for i in range(5)]
    first, _ = make_cache(redis_url, object_store, encoder, "p:").get(refs)
    Redis.from_url(redis_url).flushdb()

    again, stats = make_cache(redis_url, object_store, encoder, "p:").get(refs)

    assert (stats.encodes, stats.downloads, encoder.calls) == (0, 5, 5)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))


def test_a_corrupt_object_in_s3_is_dropped_with_a_warning_and_rewritten(
    redis_url: str, object_store: ObjectStore, caplog: pytest.LogCaptureFixture
) -> None:
    encoder = FakeEncoder()
    image = png_bytes(20)
    sha, load = ref(image)
    cache = make_cache(redis_url, object_store, encoder, "p:")
    cache.get([(sha, load)])
    good = object_store.get(cache.object_key(sha))
    object_store.put(cache.object_key(sha), good[: len(good) - 7])  # a truncated upload
    Redis.from_url(redis_url).flushdb()

    with caplog.at_level(logging.WARNING, logger="worker.embedding"):
        (got,), stats = make_cache(redis_url, object_store, encoder, "p:").get([(sha, load)])

    assert torch.equal(got, encoder.expected_for(image)) and (stats.corrupt, stats.encodes) == (1, 1)
    assert any("corrupt storage entry" in r.getMessage() for r in caplog.records)
    assert torch.equal(unpack_entry(object_store.get(cache.object_key(sha)), sha256=sha, identity=cache.identity), got)


def test_a_stopped_s3_server_degrades_the_cache_instead_of_failing_the_job(redis_url: str, private_s3: Service) -> None:
    store = ObjectStore(endpoint_url=private_s3.url, bucket="emb", region="us-east-1")
    store.ensure_bucket()
    encoder = FakeEncoder()
    private_s3.stop()
    image = png_bytes(30)

    (got,), stats = make_cache(redis_url, store, encoder, "p:").get([ref(image)])

    assert torch.equal(got, encoder.expected_for(image))
    assert (stats.encodes, stats.store_errors) == (1, 2)


@pytest.mark.slow
def test_workers_missing_on_the_same_image_together_encode_it_once_with_s3(
    redis_url: str, object_store: ObjectStore
) -> None:
    spec = (object_store.endpoint_url or "", object_store.bucket)

    results, exit_codes = run_workers(redis_url, spec, "p:", png_bytes(40), count=3, doomed=False)

    assert exit_codes == [0, 0, 0] and Redis.from_url(redis_url).get("p:encoded") == b"1"
    assert sorted(encodes for _, encodes, _ in results) == [0, 0, 1] and all(ok for ok, _, _ in results)


@pytest.mark.slow
def test_a_worker_dying_with_the_lock_delays_the_others_only_until_it_expires_with_s3(
    redis_url: str, object_store: ObjectStore
) -> None:
    spec = (object_store.endpoint_url or "", object_store.bucket)

    results, exit_codes = run_workers(redis_url, spec, "p:", png_bytes(41), count=2, doomed=True)

    assert exit_codes == [0, 0, 17] and Redis.from_url(redis_url).get("p:encoded") == b"2"
    assert sorted(encodes for _, encodes, _ in results) == [0, 1] and all(ok for ok, _, _ in results)


# --- the real image encoder (tiny random-weight model set) ---------------------------------------


@pytest.fixture(scope="module")
def tiny_model_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny model sets, written once for this module."""
    synth = pytest.importorskip("devkit.synth")
    paths: dict[str, Path] = synth.write_tiny_model_set(tmp_path_factory.mktemp("models"))
    return paths


def _renderer(paths: dict[str, Path], key: str) -> object:
    pipeline = pytest.importorskip("worker.pipeline")
    from shared.model_set import read_model_set

    return pipeline.Renderer.load(read_model_set(paths[key]), device="cpu", dtype="float32")


@pytest.mark.slow
def test_cached_embeddings_and_the_images_made_from_them_equal_the_uncached_ones_bit_for_bit(
    redis_url: str, object_store: ObjectStore, tiny_model_sets: dict[str, Path]
) -> None:
    renderer = _renderer(tiny_model_sets, "default")
    images = [png_bytes(50, size_px=64), png_bytes(51, size_px=64)]
    from shared.images import decode_reference

    direct = renderer.encode([decode_reference(d) for d in images])  # type: ignore[attr-defined]
    refs = [ref(d) for d in images]

    encoded, first = make_cache(redis_url, object_store, renderer, "p:").get(refs)  # type: ignore[arg-type]
    Redis.from_url(redis_url).flushdb()
    downloaded, second = make_cache(redis_url, object_store, renderer, "p:").get(refs)  # type: ignore[arg-type]

    assert (first.encodes, second.encodes, second.downloads) == (2, 0, 2)
    for got in (encoded, downloaded):
        assert all(torch.equal(g, d) for g, d in zip(got, direct, strict=True))
    params = parse_params({"prompt": "a cat", "seed": 7, "width": 64, "height": 64, "steps": 2})
    with_cache = renderer.generate_batch([(params, downloaded)], output="np")[0]  # type: ignore[attr-defined]
    without = renderer.generate_batch([(params, direct)], output="np")[0]  # type: ignore[attr-defined]
    assert np.array_equal(with_cache, without)


@pytest.mark.slow
def test_plain_and_plus_adapters_over_the_same_image_get_separate_entries(
    redis_url: str, object_store: ObjectStore, tiny_model_sets: dict[str, Path]
) -> None:
    plain = _renderer(tiny_model_sets, "ip-adapter_sdxl_vit-h.safetensors")
    plus = _renderer(tiny_model_sets, "ip-adapter-plus_sdxl_vit-h.safetensors")
    image = [ref(png_bytes(60, size_px=64))]

    (plain_embeds,), plain_stats = make_cache(redis_url, object_store, plain, "p:").get(image)  # type: ignore[arg-type]
    (plus_embeds,), plus_stats = make_cache(redis_url, object_store, plus, "p:").get(image)  # type: ignore[arg-type]

    assert (plain_stats.encodes, plus_stats.encodes) == (1, 1)
    assert plain_embeds.dim() == 1 and plus_embeds.dim() == 2
    assert len(object_store.list_keys("embeddings/")) == 2
