"""Object storage on any S3-compatible server (AWS S3, SeaweedFS, MinIO) through botocore.

The client is botocore's, the one boto3 hands out, made without boto3 itself: boto3 adds
nothing this module calls (its transfer manager, resources), and importing it and s3transfer
cost every `ipab submit` about 60 ms of its start.

Faults are sorted for the caller: a missing object is `ObjectMissing` (permanent), anything
that looks like the server being away or overloaded is `StorageUnavailable` (transient; the
caller retries with backoff, so boto3's own retries are kept few and its timeouts short).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import botocore.exceptions
import botocore.loaders
import botocore.session
from botocore.config import Config

from shared.errors import ObjectMissing, ObjectTooLarge, StorageUnavailable
from shared.keys import object_uri
from shared.redact import mask_text, mask_url

if TYPE_CHECKING:
    from mypy_boto3_s3.client import S3Client

    from shared.settings import Settings

CONNECT_TIMEOUT_S = 3.0
DELETE_CHUNK = 1000  # keys per DeleteObjects request, S3's limit
READ_TIMEOUT_S = 10.0
BOTO_MAX_ATTEMPTS = 2
# Used only against a custom endpoint when no AWS credentials are configured: a local
# SeaweedFS (or MinIO in its default set-up) accepts any key, but boto3 refuses to sign without one.
DUMMY_ACCESS_KEY = "ipab"
DUMMY_SECRET_KEY = "ipab-local-secret"

# The service descriptions (JSON) that botocore reads for each new session, read once per process
# and shared: a client from a fresh session cost ~70 ms, ~11 ms with this loader. Its cache only
# fills (a race fills one entry twice), so sessions of any thread may share it.
_LOADER = botocore.loaders.create_loader()
_MISSING_CODES = frozenset({"404", "NoSuchKey", "NotFound"})
# For reads of objects named by users: a missing bucket or a refusal reads as "missing" too,
# so that the answer does not tell which objects exist where the reader may not look.
_UNREADABLE_CODES = _MISSING_CODES | frozenset(
    {"403", "AccessDenied", "Forbidden", "NoSuchBucket", "AllAccessDisabled"}
)
# Checking that the store answers at all (at a command's start): one short try, not the
# retried, long-read-timeout budget of real transfers, so a hung endpoint costs seconds.
PROBE_READ_TIMEOUT_S = 5.0
_NETWORK_ERRORS: tuple[type[Exception], ...] = (
    botocore.exceptions.ConnectionError,
    botocore.exceptions.HTTPClientError,
    botocore.exceptions.IncompleteReadError,
    botocore.exceptions.ResponseStreamingError,
    botocore.exceptions.NoCredentialsError,
)


def _credentials_configured() -> bool:
    if os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE"):
        return True
    shared_file = os.environ.get("AWS_SHARED_CREDENTIALS_FILE", str(Path.home() / ".aws" / "credentials"))
    return Path(shared_file).is_file()


def parse_uri(uri: str) -> tuple[str, str]:
    """Split `s3://bucket/key` into (bucket, key); `ValueError` naming the URI otherwise."""
    if not uri.startswith("s3://"):
        raise ValueError(f"{uri!r} is not an s3:// URI; write s3://bucket/key")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or not key:
        raise ValueError(f"{uri!r} needs both a bucket and a key: s3://bucket/key")
    return bucket, key


def _error_code(error: botocore.exceptions.ClientError) -> str:
    return str(error.response.get("Error", {}).get("Code", ""))


class ObjectStore:
    """One bucket on an S3-compatible server; safe to share between threads (one client, built once)."""

    def __init__(self, *, endpoint_url: str | None, bucket: str, region: str) -> None:
        self.endpoint_url = endpoint_url
        self.bucket = bucket
        self.region = region
        self._client = self._build_client()

    def with_bucket(self, bucket: str) -> ObjectStore:
        """The same server and client, another bucket (for `s3://other-bucket/...` references)."""
        other = object.__new__(ObjectStore)
        other.endpoint_url, other.bucket, other.region = self.endpoint_url, bucket, self.region
        other._client = self._client
        return other

    @classmethod
    def from_settings(cls, settings: Settings) -> ObjectStore:
        """The store that `IPAB_S3_ENDPOINT_URL`, `IPAB_S3_BUCKET` and `IPAB_S3_REGION` describe."""
        return cls(endpoint_url=settings.s3_endpoint_url, bucket=settings.s3_bucket, region=settings.s3_region)

    def _build_client(
        self, *, read_timeout_s: float = READ_TIMEOUT_S, max_attempts: int = BOTO_MAX_ATTEMPTS
    ) -> S3Client:
        config = Config(
            connect_timeout=CONNECT_TIMEOUT_S,
            read_timeout=read_timeout_s,
            retries={"max_attempts": max_attempts, "mode": "standard"},
            s3={"addressing_style": "path"} if self.endpoint_url else {},
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
        )
        keys: dict[str, Any] = {}
        if self.endpoint_url and not _credentials_configured():
            keys = {"aws_access_key_id": DUMMY_ACCESS_KEY, "aws_secret_access_key": DUMMY_SECRET_KEY}
        # A private session: a shared one is not thread-safe to create clients from.
        session = botocore.session.Session()
        session.register_component("data_loader", _LOADER)
        client = session.create_client(
            "s3", region_name=self.region, endpoint_url=self.endpoint_url, config=config, **keys
        )
        return cast("S3Client", client)

    def __repr__(self) -> str:
        return f"ObjectStore(endpoint_url={self.endpoint_url!r}, bucket={self.bucket!r})"

    @property
    def where(self) -> str:
        """The endpoint, for messages: the URL, or `AWS S3` when none is set."""
        return mask_url(self.endpoint_url) if self.endpoint_url else f"AWS S3 ({self.region})"

    def uri(self, key: str) -> str:
        """`s3://bucket/key`."""
        return object_uri(self.bucket, key)

    @contextmanager
    def _translated(self, action: str, key: str = "", *, missing: frozenset[str] = _MISSING_CODES) -> Iterator[None]:
        target = self.uri(key) if key else f"bucket {self.bucket!r}"
        try:
            yield
        except _NETWORK_ERRORS as e:
            raise StorageUnavailable(
                f"object store at IPAB_S3_ENDPOINT_URL={self.where} unreachable while trying to {action} {target}: "
                f"{mask_text(str(e))}; check that it runs and IPAB_S3_ENDPOINT_URL points at it"
            ) from e
        except botocore.exceptions.ClientError as e:
            if key and _error_code(e) in missing:
                raise ObjectMissing(f"{self.uri(key)} does not exist at {self.where}") from e
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            raise StorageUnavailable(
                f"object store at {self.where} refused to {action} {target}: "
                f"{_error_code(e) or status} ({e}); check IPAB_S3_BUCKET and the AWS credentials"
            ) from e

    def ensure_bucket(self) -> None:
        """Create the bucket unless it exists already (idempotent); a store that does not answer fails in seconds."""
        probe = self._build_client(read_timeout_s=PROBE_READ_TIMEOUT_S, max_attempts=1)
        with self._translated("check"):
            try:
                probe.head_bucket(Bucket=self.bucket)
                return
            except botocore.exceptions.ClientError as e:
                if _error_code(e) not in {"404", "NoSuchBucket", "NotFound"}:
                    raise
        with self._translated("create"):
            try:
                self._client.create_bucket(Bucket=self.bucket, **self._location())
            except botocore.exceptions.ClientError as e:
                if _error_code(e) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                    raise

    def _location(self) -> dict[str, Any]:
        # AWS rejects an explicit us-east-1 constraint and requires one everywhere else.
        if self.endpoint_url or self.region == "us-east-1":
            return {}
        return {"CreateBucketConfiguration": {"LocationConstraint": self.region}}

    def put(
        self,
        key: str,
        data: bytes,
        *,
        metadata: dict[str, str] | None = None,
        content_type: str = "application/octet-stream",
    ) -> None:
        """Write `data` at `key` (overwriting: keys are deterministic, so a rewrite is the same object)."""
        with self._translated("write", key):
            self._client.put_object(
                Bucket=self.bucket, Key=key, Body=data, Metadata=metadata or {}, ContentType=content_type
            )

    def get(self, key: str) -> bytes:
        """The bytes at `key`; `ObjectMissing` if there are none."""
        with self._translated("read", key):
            response = self._client.get_object(Bucket=self.bucket, Key=key)
            body: bytes = response["Body"].read()
            return body

    def get_bounded(self, key: str, *, max_bytes: int) -> bytes:
        """The bytes at `key`, read only if HEAD says they fit `max_bytes` (and never more than that).

        `ObjectMissing` also for a missing bucket or a refused read (one answer for all three);
        `ObjectTooLarge` before any byte is read.
        """
        with self._translated("inspect", key, missing=_UNREADABLE_CODES):
            size_bytes = int(self._client.head_object(Bucket=self.bucket, Key=key).get("ContentLength", 0))
        if size_bytes > max_bytes:
            raise ObjectTooLarge(self.uri(key), size_bytes=size_bytes, max_bytes=max_bytes)
        if size_bytes == 0:  # a range request on an empty object is refused (416)
            return b""
        with self._translated("read", key, missing=_UNREADABLE_CODES):
            # The object may have grown since the HEAD: ask for one byte past the limit at most.
            response = self._client.get_object(Bucket=self.bucket, Key=key, Range=f"bytes=0-{max_bytes}")
            data: bytes = response["Body"].read(max_bytes + 1)
        if len(data) > max_bytes:
            raise ObjectTooLarge(self.uri(key), size_bytes=len(data), max_bytes=max_bytes)
        return data

    def head(self, key: str) -> dict[str, str] | None:
        """The user metadata stored with `key`, or None if there is no such object."""
        try:
            with self._translated("inspect", key):
                response = self._client.head_object(Bucket=self.bucket, Key=key)
        except ObjectMissing:
            return None
        return dict(response.get("Metadata", {}))

    def exists(self, key: str) -> bool:
        """Whether an object is stored at `key`."""
        return self.head(key) is not None

    def delete(self, key: str) -> None:
        """Remove `key`; removing a missing key is not an error."""
        with self._translated("delete", key):
            self._client.delete_object(Bucket=self.bucket, Key=key)

    def delete_many(self, keys: Sequence[str]) -> None:
        """Remove `keys`, up to `DELETE_CHUNK` per request (S3 DeleteObjects); missing keys are not an error."""
        for start in range(0, len(keys), DELETE_CHUNK):
            chunk = list(keys[start : start + DELETE_CHUNK])
            with self._translated(f"delete {len(chunk)} object(s) from"):
                response = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": key} for key in chunk], "Quiet": True}
                )
            errors = response.get("Errors", [])
            if errors:
                first = errors[0]
                raise StorageUnavailable(
                    f"object store at {self.where} refused to delete {len(errors)} object(s), the first "
                    f"{self.uri(first.get('Key', '?'))}: {first.get('Code', '?')} ({first.get('Message', '')}); "
                    "check the AWS credentials' delete permission on IPAB_S3_BUCKET"
                )

    def size_of(self, key: str) -> int | None:
        """The size in bytes of the object at `key`, or None if there is none."""
        try:
            with self._translated("inspect", key):
                response = self._client.head_object(Bucket=self.bucket, Key=key)
        except ObjectMissing:
            return None
        return int(response.get("ContentLength", 0))

    def list_sizes(self, prefix: str) -> dict[str, int]:
        """Every key under `prefix` with its size in bytes."""
        found: dict[str, int] = {}
        with self._translated(f"list {prefix!r} in"):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                found.update((item["Key"], int(item.get("Size", 0))) for item in page.get("Contents", []))
        return found

    def list_folders(self, prefix: str) -> list[str]:
        """The names of the "folders" right under `prefix` (the parts up to the next `/`), sorted."""
        names: set[str] = set()
        with self._translated(f"list {prefix!r} in"):
            pages = self._client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=prefix, Delimiter="/"
            )
            for page in pages:
                names.update(p["Prefix"][len(prefix) :].rstrip("/") for p in page.get("CommonPrefixes", []))
        return sorted(names)

    def list_keys(self, prefix: str = "") -> list[str]:
        """Every key under `prefix`, sorted."""
        keys: list[str] = []
        with self._translated(f"list {prefix!r} in"):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(item["Key"] for item in page.get("Contents", []) if "Key" in item)
        return sorted(keys)

    def presigned_url(self, key: str, *, expiry_s: float) -> str:
        """A URL that lets anybody GET `key` for `expiry_s` seconds (signed locally, no request)."""
        with self._translated("sign a URL for", key):
            url: str = self._client.generate_presigned_url(
                "get_object", Params={"Bucket": self.bucket, "Key": key}, ExpiresIn=int(expiry_s)
            )
            return url
