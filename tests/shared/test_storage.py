"""The object store against a real SeaweedFS: round trips, missing keys, outages, restarts."""

from __future__ import annotations

import time

import pytest

from devkit.services import Service
from shared.errors import ObjectMissing, PermanentError, StorageUnavailable, TransientError
from shared.storage import ObjectStore, parse_uri


def test_put_then_get_returns_the_bytes_and_head_the_metadata(object_store: ObjectStore) -> None:
    data = bytes(range(256)) * 100
    object_store.put("outputs/b1/j1.png", data, metadata={"job-id": "j1", "seed": "42"}, content_type="image/png")

    assert object_store.get("outputs/b1/j1.png") == data
    assert object_store.head("outputs/b1/j1.png") == {"job-id": "j1", "seed": "42"}
    assert object_store.exists("outputs/b1/j1.png")


def test_rewriting_a_key_replaces_the_object(object_store: ObjectStore) -> None:
    object_store.put("k", b"first", metadata={"n": "1"})
    object_store.put("k", b"second", metadata={"n": "2"})

    assert object_store.get("k") == b"second"
    assert object_store.head("k") == {"n": "2"}
    assert object_store.list_keys("") == ["k"]


def test_a_missing_key_raises_object_missing_naming_its_uri(object_store: ObjectStore) -> None:
    with pytest.raises(ObjectMissing, match=f"s3://{object_store.bucket}/nope/missing.png"):
        object_store.get("nope/missing.png")

    assert issubclass(ObjectMissing, PermanentError)
    assert object_store.head("nope/missing.png") is None
    assert not object_store.exists("nope/missing.png")


def test_list_keys_returns_every_key_under_a_prefix_sorted(object_store: ObjectStore) -> None:
    for key in ["outputs/b/2.png", "outputs/b/1.png", "outputs/c/1.png", "refs/x.png"]:
        object_store.put(key, b"x")

    assert object_store.list_keys("outputs/b/") == ["outputs/b/1.png", "outputs/b/2.png"]
    assert object_store.list_keys("nothing/") == []


def test_delete_removes_a_key_and_tolerates_a_missing_one(object_store: ObjectStore) -> None:
    object_store.put("gone", b"x")
    object_store.delete("gone")
    object_store.delete("gone")

    assert not object_store.exists("gone")


def test_ensure_bucket_is_idempotent(object_store: ObjectStore) -> None:
    object_store.put("kept", b"x")
    object_store.ensure_bucket()

    assert object_store.get("kept") == b"x"


def test_uri_names_bucket_and_key_and_parses_back(object_store: ObjectStore) -> None:
    uri = object_store.uri("outputs/b/j.png")

    assert uri == f"s3://{object_store.bucket}/outputs/b/j.png"
    assert parse_uri(uri) == (object_store.bucket, "outputs/b/j.png")
    with pytest.raises(ValueError, match="s3://bucket/key"):
        parse_uri("s3://only-bucket")


def test_a_store_on_another_bucket_shares_the_server(object_store: ObjectStore) -> None:
    other = object_store.with_bucket(object_store.bucket + "-other")
    other.ensure_bucket()
    other.put("k", b"other")

    assert other.get("k") == b"other"
    assert not object_store.exists("k")


def test_a_stopped_server_raises_storage_unavailable_quickly(private_s3: Service) -> None:
    store = ObjectStore(endpoint_url=private_s3.url, bucket="outage", region="us-east-1")
    store.ensure_bucket()
    private_s3.stop()

    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match=private_s3.url):
        store.get("any")
    assert time.monotonic() - started < 10  # short timeouts, few retries: the caller backs off
    assert issubclass(StorageUnavailable, TransientError)


def test_a_restarted_server_keeps_buckets_objects_and_metadata(private_s3: Service) -> None:
    store = ObjectStore(endpoint_url=private_s3.url, bucket="durable", region="us-east-1")
    store.ensure_bucket()
    store.put("outputs/b/j.png", b"png bytes", metadata={"job-id": "j"})

    private_s3.restart()

    assert store.get("outputs/b/j.png") == b"png bytes"
    assert store.head("outputs/b/j.png") == {"job-id": "j"}
    store.put("after", b"restart")
    assert store.list_keys("") == ["after", "outputs/b/j.png"]
