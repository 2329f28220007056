"""Where an export is written: a local folder or an `s3://bucket/prefix`, behind one small interface."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import IO, Final, Protocol

from shared.errors import InvalidInput, ObjectMissing
from shared.storage import ObjectStore, parse_uri

SPOOL_MEMORY_BYTES: Final = 64 * 1024 * 1024  # a bigger S3 file spills to a temporary file before its upload


class Destination(Protocol):
    """Files of an export, by path relative to its root (`train/metadata.jsonl`)."""

    def describe(self, relpath: str = "") -> str:
        """The path or URI, for messages."""
        ...

    def read(self, relpath: str) -> bytes | None:
        """The file's bytes, or None when there is no such file."""
        ...

    def write(self, relpath: str, data: bytes) -> None:
        """Write (replace) a whole file."""
        ...

    def open_write(self, relpath: str) -> AbstractContextManager[IO[bytes]]:
        """A binary file to stream into; it appears at `relpath` only once closed without error."""
        ...


class LocalDir:
    """A folder on this machine; files are written to a temporary name and renamed (never half there)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def describe(self, relpath: str = "") -> str:
        """The file's path."""
        return str(self.root / relpath) if relpath else str(self.root)

    def read(self, relpath: str) -> bytes | None:
        """The file's bytes, or None."""
        try:
            return (self.root / relpath).read_bytes()
        except FileNotFoundError:
            return None

    def write(self, relpath: str, data: bytes) -> None:
        """Write the whole file atomically."""
        with self.open_write(relpath) as out:
            out.write(data)

    @contextmanager
    def open_write(self, relpath: str) -> Iterator[IO[bytes]]:
        """A temporary file beside the target, renamed over it when the block ends without error."""
        target = self.root / relpath
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as out:
                yield out
            os.replace(tmp, target)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class S3Prefix:
    """Objects under `s3://bucket/prefix/` on the configured object store."""

    def __init__(self, store: ObjectStore, prefix: str) -> None:
        self.store = store
        self.prefix = prefix.strip("/")

    def _key(self, relpath: str) -> str:
        return f"{self.prefix}/{relpath}" if self.prefix else relpath

    def describe(self, relpath: str = "") -> str:
        """The object's URI."""
        return self.store.uri(self._key(relpath))

    def read(self, relpath: str) -> bytes | None:
        """The object's bytes, or None."""
        try:
            return self.store.get(self._key(relpath))
        except ObjectMissing:
            return None

    def write(self, relpath: str, data: bytes) -> None:
        """Upload the whole object."""
        self.store.put(self._key(relpath), data)

    @contextmanager
    def open_write(self, relpath: str) -> Iterator[IO[bytes]]:
        """A spooled temporary file, uploaded when the block ends without error."""
        with tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES) as out:
            yield out
            out.seek(0)
            self.store.put(self._key(relpath), out.read())


def open_destination(out: str, *, store: ObjectStore) -> Destination:
    """A `Destination` for `--out`: `s3://bucket/prefix` on the configured object store, else a folder."""
    if out.startswith("s3://"):
        bucket, _, prefix = out.removeprefix("s3://").partition("/")
        if not bucket:
            raise InvalidInput("--out", out, "needs a bucket: s3://bucket/prefix")
        if prefix:
            parse_uri(out)  # the same checks as every s3:// URI
        return S3Prefix(store.with_bucket(bucket), prefix)
    return LocalDir(Path(out))
