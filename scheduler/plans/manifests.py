"""A plan's manifest, read from where the plan says: a local path or an `s3://` URI.

The same reading serves `ipab plans apply` (is the manifest there, are its rows valid?)
and each slot (the manifest as it is at slot time). Local paths are stored absolute, so
a beat on another host needs the same path there; an `s3://` manifest works from any
host. References in an `s3://` manifest should be `s3://` URIs too: in a plan file's
plan, relative paths are read from the beat's working folder; in a plan sent through the
API (`local=False`), paths are refused, at apply and at every slot.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final

from scheduler.submission.manifest import ParsedManifest, Problem, parse_manifest, parse_rows, read_raw_rows
from scheduler.submission.references import ReferenceResolver, resolve_rows
from shared.errors import InvalidInput, ObjectMissing, ObjectTooLarge
from shared.settings import Settings
from shared.storage import ObjectStore, parse_uri

S3_SCHEME: Final = "s3://"
MAX_MANIFEST_BYTES: Final = 2 * 1024**3
MANIFEST_FIELD: Final = "manifest"
REMOTE_MANIFEST_HINT: Final = (
    "must be an s3:// URI in an allowed reference bucket when the plan comes through the API: "
    "a path would be read from the server's disk; upload the manifest and write its s3:// URI"
)


@dataclass(frozen=True)
class PlanRows:
    """A manifest's rows as validated now, and the resolver that read (and will upload) their references."""

    parsed: ParsedManifest
    resolver: ReferenceResolver


def manifest_location(raw: object, *, base_dir: Path | None) -> str:
    """Where a plan file's `manifest` points: an `s3://` URI, or a path made absolute from the plan's folder.

    `base_dir` None (a plan sent over the API) admits `s3://` URIs only: a path would be
    read from the server's own disk, which an API caller must not reach.
    """
    if not isinstance(raw, str) or not raw.strip():
        raise InvalidInput(MANIFEST_FIELD, raw, "must be a JSONL/CSV path (relative to the plan file) or s3:// URI")
    if raw.startswith(S3_SCHEME):
        try:
            parse_uri(raw)
        except ValueError as e:
            raise InvalidInput(MANIFEST_FIELD, raw, str(e)) from None
        return raw
    if base_dir is None:
        raise InvalidInput(MANIFEST_FIELD, raw, REMOTE_MANIFEST_HINT)
    path = (base_dir / raw).resolve()
    if not path.is_file():
        raise InvalidInput(MANIFEST_FIELD, raw, f"does not exist (looked for {path}); fix the path")
    return str(path)


def _s3_bytes(uri: str, settings: Settings) -> bytes:
    bucket, key = parse_uri(uri)
    store = ObjectStore.from_settings(settings)
    allowed = tuple(settings.reference_buckets) or (store.bucket,)
    if bucket not in allowed:  # the same rule as references: these credentials may reach more
        reason = f"is in bucket {bucket!r}, not an allowed one ({', '.join(allowed)}); set IPAB_REFERENCE_BUCKETS"
        raise InvalidInput(MANIFEST_FIELD, uri, reason)
    try:
        return store.with_bucket(bucket).get_bounded(key, max_bytes=MAX_MANIFEST_BYTES)
    except ObjectMissing:
        raise InvalidInput(MANIFEST_FIELD, uri, f"does not exist or cannot be read at {store.where}") from None
    except ObjectTooLarge as e:
        raise InvalidInput(MANIFEST_FIELD, uri, f"holds {e.size_bytes} bytes, more than {e.max_bytes}") from None


def _parse(
    location: str, defaults: Mapping[str, Any], settings: Settings, *, local: bool
) -> tuple[ParsedManifest, Path]:
    """The parsed rows and the folder relative references are read from."""
    if not location.startswith(S3_SCHEME):
        if not local:
            raise InvalidInput(MANIFEST_FIELD, location, REMOTE_MANIFEST_HINT)
        path = Path(location)
        if not path.is_file():
            raise InvalidInput(MANIFEST_FIELD, location, "does not exist any more; restore it or apply the plan again")
        return parse_manifest(path, defaults=defaults), path.parent
    data = _s3_bytes(location, settings)
    with tempfile.TemporaryDirectory(prefix="ipab-plan-") as folder:
        path = Path(folder) / PurePosixPath(parse_uri(location)[1]).name  # its suffix says JSONL or CSV
        path.write_bytes(data)
        # Named by its URI in problems: the temporary file's path is the server's business.
        return parse_rows(read_raw_rows(path), defaults=defaults, source=repr(location)), Path.cwd()


def read_plan_rows(location: str, *, defaults: Mapping[str, Any], settings: Settings, local: bool) -> PlanRows:
    """Read and validate every row of the manifest at `location` with the plan's defaults.

    `local` False (a plan sent through the API): the manifest and every reference must be
    `s3://` URIs; this host's disk is never read. Raises `InvalidInput` naming `manifest`
    when it cannot be read; row problems are in the result (`parsed.problems`), as
    `parse_manifest` gives them.
    """
    parsed, base_dir = _parse(location, defaults, settings, local=local)
    resolver = ReferenceResolver(
        store=ObjectStore.from_settings(settings),
        roots=settings.reference_roots,
        base_dir=base_dir,
        buckets=settings.reference_buckets,
        remote_only=not local,
    )
    return PlanRows(parsed, resolver)


def reference_problems(rows: PlanRows) -> list[Problem]:
    """Problems of the references of valid rows: missing, outside the allowed folders, not an image."""
    _, problems = resolve_rows([(row.line, row.references) for row in rows.parsed.rows], resolver=rows.resolver)
    return problems
