"""Reference images at the edge: find, read once, decode, then store once by content hash.

A local reference must be a regular file inside the allowed roots (symlinks and `..` are
resolved before the check, so neither can escape them; by default the roots are the working
folder and the manifest's own). An `s3://` reference must lie in an allowed bucket
(IPAB_REFERENCE_BUCKETS, by default IPAB_S3_BUCKET alone) and is read only after a HEAD
shows it is small enough; missing and forbidden objects get the same answer.
Every image is decoded with `shared.images.decode_reference`, the same check the worker
runs. Each distinct image (by the sha256 of its bytes) is uploaded once to
`refs/<sha256>.<ext>` and recorded in `reference_images`.
"""

from __future__ import annotations

import hashlib
import stat
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sqlalchemy import select
from sqlalchemy.orm import Session

from scheduler.submission.manifest import REFERENCE_FIELD, Problem, problem_from
from shared.db import ReferenceImage, insert_ignoring_duplicates, utcnow
from shared.errors import InvalidInput, ObjectMissing, ObjectTooLarge
from shared.images import MAX_REFERENCE_BYTES, decode_reference, sniff_format
from shared.janitor.references import claim_references
from shared.keys import ref_key
from shared.spec import Reference
from shared.storage import ObjectStore, parse_uri

S3_SCHEME: Final = "s3://"
# Bytes of distinct images kept in memory between validation and upload; past this they
# are read again at upload time (and must hash the same), so a manifest of 100k distinct
# photos does not hold them all at once.
KEEP_BYTES_BUDGET: Final = 256 * 1024 * 1024
UPLOAD_THREADS: Final = 8
REMOTE_REFERENCE_HINT: Final = (
    "must be an s3:// URI in an allowed reference bucket here (a plan sent through the API): a path "
    "would be read from the server's disk; upload the image and write its s3:// URI"
)
CONTENT_TYPES: Final = {
    "png": "image/png",
    "jpg": "image/jpeg",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "tiff": "image/tiff",
    "gif": "image/gif",
}


@dataclass(frozen=True)
class ReferenceFile:
    """One distinct, decodable reference image; `source` is a resolved path or an s3:// URI."""

    sha256: str
    ext: str
    width: int
    height: int
    size_bytes: int
    source: str

    @property
    def key(self) -> str:
        """Its content-addressed object key, `refs/<sha256>.<ext>`."""
        return ref_key(self.sha256, self.ext)

    def reference(self) -> Reference:
        """The spec's reference to it."""
        return Reference(sha256=self.sha256, key=self.key)


def allowed_roots(roots: Sequence[Path], *, base_dir: Path | None = None) -> list[Path]:
    """The folders references may come from, resolved; none configured: the working dir and the manifest's folder."""
    if roots:
        return [root.resolve() for root in roots]
    defaults = [Path.cwd().resolve()] + ([base_dir.resolve()] if base_dir is not None else [])
    return list(dict.fromkeys(defaults))


def check_local_path(raw: str, *, roots: Sequence[Path], base_dir: Path) -> Path:
    """The resolved path of a local reference, or `InvalidInput` if it escapes the roots or is no file.

    Containment is checked before existence, so refusals never tell whether a file exists
    outside the roots.
    """
    path = Path(raw) if Path(raw).is_absolute() else base_dir / raw
    try:
        real = path.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte
        raise InvalidInput(REFERENCE_FIELD, raw, f"cannot be resolved ({e}); fix the link") from None
    if not any(real.is_relative_to(root) for root in roots):
        shown = ", ".join(str(r) for r in roots)
        raise InvalidInput(
            REFERENCE_FIELD,
            raw,
            f"resolves to {real}, outside the allowed folders ({shown}); move it there or set IPAB_REFERENCE_ROOTS",
        )
    try:
        mode = real.stat().st_mode
    except FileNotFoundError:
        raise InvalidInput(REFERENCE_FIELD, raw, f"does not exist (looked for {path}); check the path") from None
    except (OSError, ValueError) as e:
        raise InvalidInput(REFERENCE_FIELD, raw, f"cannot be read ({e}); check its permissions") from None
    if not stat.S_ISREG(mode):
        # Reading a FIFO or a device would block or never end.
        raise InvalidInput(REFERENCE_FIELD, raw, "is not a regular file (a folder, pipe or device?); give an image")
    return real


def _read_local(raw: str, real: Path) -> bytes:
    try:
        with real.open("rb") as f:
            data = f.read(MAX_REFERENCE_BYTES + 1)
    except OSError as e:
        raise InvalidInput(REFERENCE_FIELD, raw, f"cannot be read ({e.strerror}); check its permissions") from None
    if len(data) > MAX_REFERENCE_BYTES:
        raise InvalidInput(REFERENCE_FIELD, raw, f"is larger than {MAX_REFERENCE_BYTES} bytes; use a smaller image")
    return data


def _read_s3(raw: str, store: ObjectStore, buckets: Sequence[str]) -> bytes:
    try:
        bucket, key = parse_uri(raw)
    except ValueError as e:
        raise InvalidInput(REFERENCE_FIELD, raw, str(e)) from None
    # Checked before any request: the scheduler's credentials may reach buckets that the
    # people writing manifests must not read (or probe for which objects exist).
    if bucket not in buckets:
        allowed = ", ".join(buckets)
        reason = f"is in bucket {bucket!r}, not an allowed one ({allowed}); copy it there or set IPAB_REFERENCE_BUCKETS"
        raise InvalidInput(REFERENCE_FIELD, raw, reason)
    try:
        return store.with_bucket(bucket).get_bounded(key, max_bytes=MAX_REFERENCE_BYTES)
    except ObjectTooLarge as e:
        raise InvalidInput(REFERENCE_FIELD, raw, f"holds {e.size_bytes} bytes, more than {e.max_bytes}") from None
    except ObjectMissing:
        # One message for missing and forbidden: it must not tell which objects exist.
        reason = f"does not exist or cannot be read at {store.where}; upload it, fix the URI or grant read access"
        raise InvalidInput(REFERENCE_FIELD, raw, reason) from None


class ReferenceResolver:
    """Resolves references as written in a manifest, reading and decoding each image once.

    `remote_only` (a plan sent through the API): every reference must be an `s3://` URI; a
    path is refused as written, before it is resolved, so nothing of the server's disk is read
    or shown.
    """

    def __init__(
        self,
        *,
        store: ObjectStore,
        roots: Sequence[Path],
        base_dir: Path,
        buckets: Sequence[str] = (),
        remote_only: bool = False,
    ) -> None:
        self.store = store
        self.remote_only = remote_only
        self.roots = allowed_roots(roots, base_dir=base_dir)
        self.base_dir = base_dir
        self.buckets = tuple(buckets) or (store.bucket,)  # none configured: the project's own bucket
        # A file, or why it is refused: by the text as written, and by resolved path or URI.
        self._by_raw: dict[str, ReferenceFile | str] = {}
        self._by_source: dict[str, ReferenceFile] = {}
        self._data: dict[str, bytes] = {}  # sha256 -> bytes, within KEEP_BYTES_BUDGET
        self._kept_bytes = 0
        self.files: dict[str, ReferenceFile] = {}  # sha256 -> file, every distinct image
        # sha256s recorded in `reference_images` already: stored, so no HEAD and no upload.
        self.recorded: set[str] = set()

    def resolve(self, raw: str) -> ReferenceFile:
        """The checked image behind `raw` (a path or s3:// URI); `InvalidInput` naming `reference`."""
        # Checked once per distinct text: 100k rows naming one file resolve and read it once.
        if raw not in self._by_raw:
            self._by_raw[raw] = self._resolve_new(raw)
        found = self._by_raw[raw]
        if isinstance(found, str):
            raise InvalidInput(REFERENCE_FIELD, raw, found)
        return found

    def _resolve_new(self, raw: str) -> ReferenceFile | str:
        try:
            local = not raw.startswith(S3_SCHEME)
            if local and self.remote_only:
                raise InvalidInput(REFERENCE_FIELD, raw, REMOTE_REFERENCE_HINT)
            source = str(check_local_path(raw, roots=self.roots, base_dir=self.base_dir)) if local else raw
            if source not in self._by_source:  # another spelling of a file already read
                self._by_source[source] = self._load(raw, source)
            return self._by_source[source]
        except InvalidInput as e:
            return _reason_of(e, raw)

    def _read(self, raw: str, source: str) -> bytes:
        if source.startswith(S3_SCHEME):
            return _read_s3(raw, self.store, self.buckets)
        return _read_local(raw, Path(source))

    def _load(self, raw: str, source: str) -> ReferenceFile:
        data = self._read(raw, source)
        image = decode_reference(data, field=REFERENCE_FIELD)
        sha = hashlib.sha256(data).hexdigest()
        found = ReferenceFile(sha, sniff_format(data), image.width, image.height, len(data), source)
        self.files.setdefault(sha, found)
        if sha not in self._data and self._kept_bytes + len(data) <= KEEP_BYTES_BUDGET:
            self._data[sha] = data
            self._kept_bytes += len(data)
        return found

    def data_of(self, file: ReferenceFile) -> bytes:
        """The bytes of `file`: kept from validation, or read again and checked to be unchanged."""
        kept = self._data.get(file.sha256)
        if kept is not None:
            return kept
        data = self._read(file.source, file.source)
        if hashlib.sha256(data).hexdigest() != file.sha256:
            raise InvalidInput(REFERENCE_FIELD, file.source, "changed while being submitted; submit again")
        return data


def _reason_of(e: InvalidInput, raw: str) -> str:
    # The message will show `raw`; keep what the decoder saw (a size, the dimensions) too.
    # Never the file's bytes: decode errors show sizes and formats only.
    return e.allowed if e.value == raw else f"{e.allowed} (found {e.value})"


def resolve_rows(
    rows: Iterable[tuple[int, Sequence[str]]], *, resolver: ReferenceResolver
) -> tuple[dict[int, tuple[ReferenceFile, ...]], list[Problem]]:
    """The reference files of each (line, references) row, and a problem for each bad reference."""
    resolved: dict[int, tuple[ReferenceFile, ...]] = {}
    problems: list[Problem] = []
    for line, references in rows:
        files = []
        for raw in references:
            try:
                files.append(resolver.resolve(raw))
            except InvalidInput as e:
                problems.append(problem_from(line, e))
        if len(files) == len(references):
            resolved[line] = tuple(files)
    return resolved, problems


@dataclass(frozen=True)
class UploadReport:
    """How many distinct reference images were uploaded now, and how many were stored already."""

    uploaded: int
    already_stored: int


def _hold_uploads(session: Session, shas: Sequence[str]) -> None:
    """Hold a tenant's uploads that the submission uses until it commits (its batch then keeps them);
    one deleted since the submission looked it up (`DELETE /v1/references`, then the janitor) refuses it."""
    if not shas:
        return
    again = claim_references(session, shas)  # a mark is cleared here: its objects are still whole
    if again:
        present = set(session.scalars(select(ReferenceImage.sha256).where(ReferenceImage.sha256.in_(sorted(again)))))
        gone = sorted(again - present)
        if gone:
            raise InvalidInput("references", gone[0], "was deleted meanwhile; upload it again (POST /v1/references)")


def upload_references(files: Iterable[ReferenceFile], *, resolver: ReferenceResolver, session: Session) -> UploadReport:
    """Upload each image unless its object exists, then record all in `reference_images` (idempotent).

    Images the resolver knows to be recorded already (`resolver.recorded`: a tenant's uploads)
    are skipped without a HEAD (a row is recorded only after its object was stored), and held
    (`_hold_uploads`). The others are claimed in the session's
    transaction (`shared.janitor.references.claim_references`): the janitor cannot remove them
    until it commits, and those it was removing are checked and uploaded again.
    """
    every = {f.sha256: f for f in files}
    distinct = [f for sha256, f in every.items() if sha256 not in resolver.recorded]
    _hold_uploads(session, [sha256 for sha256 in every if sha256 in resolver.recorded])

    def upload(file: ReferenceFile) -> bool:
        if resolver.store.exists(file.key):
            return False
        content_type = CONTENT_TYPES.get(file.ext, "application/octet-stream")
        resolver.store.put(
            file.key, resolver.data_of(file), metadata={"sha256": file.sha256}, content_type=content_type
        )
        return True

    if not distinct:
        return UploadReport(uploaded=0, already_stored=len(every))
    # boto3 clients are thread-safe; many distinct images upload in parallel.
    with ThreadPoolExecutor(max_workers=UPLOAD_THREADS) as pool:
        done = dict(zip((f.sha256 for f in distinct), pool.map(upload, distinct), strict=True))
    # The janitor may have been removing some of them since the HEADs above: held now, looked at again.
    again = claim_references(session, list(done))
    done.update((f.sha256, upload(f) or done[f.sha256]) for f in distinct if f.sha256 in again)
    record_references(distinct, session=session)
    uploaded = sum(done.values())
    return UploadReport(uploaded=uploaded, already_stored=len(every) - uploaded)


def record_references(files: Sequence[ReferenceFile], *, session: Session) -> None:
    """Insert rows for `files` into `reference_images`, leaving rows that exist alone."""
    if not files:
        return
    now = utcnow()
    values = [
        {
            "sha256": f.sha256,
            "key": f.key,
            "ext": f.ext,
            "width": f.width,
            "height": f.height,
            "size_bytes": f.size_bytes,
            "created_at": now,
        }
        for f in files
    ]
    stmt = insert_ignoring_duplicates(ReferenceImage, dialect=session.get_bind().dialect.name, unique=["sha256"])
    session.execute(stmt, values)
