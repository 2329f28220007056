"""The control plane's edges: which buckets and folders a manifest may read, what errors reveal,
bounded reads and decodes, batch names, oversized CSV cells, and `retry --failed` without Redis.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from PIL import Image
from sqlalchemy import update

from scheduler.cli.batches import printable
from scheduler.submission.manifest import parse_manifest
from scheduler.submission.references import ReferenceResolver
from scheduler.submission.submit import submit_manifest
from shared.db import Job, JobStatus, make_engine, make_session_factory
from shared.errors import InvalidInput, ObjectTooLarge
from shared.images import DECODER_SLACK_BYTES, MAX_DECODED_BYTES, decode_reference
from shared.redact import mask_text
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.conftest import unique_name
from tests.scheduler.submission.conftest import Run, load_jobs, run_ipab, write_jsonl, write_photos

MODEL_SET = "tiny-hardening"
SECRET_FILE = b"PGPASSWORD=TopSecret\n"


def png_bytes(size: tuple[int, int] = (64, 64), mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, 128 if mode == "L" else (10, 20, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def resolver_for(store: ObjectStore, tmp_path: Path, buckets: tuple[str, ...] = ()) -> ReferenceResolver:
    return ReferenceResolver(store=store, roots=[tmp_path], base_dir=tmp_path, buckets=buckets)


def refusal(resolver: ReferenceResolver, raw: str) -> str:
    with pytest.raises(InvalidInput) as caught:
        resolver.resolve(raw)
    return str(caught.value)


# 6. Buckets a manifest may read; what the errors show.


def test_a_reference_in_another_bucket_is_refused_without_reading_it(object_store: ObjectStore, tmp_path: Path) -> None:
    secrets = object_store.with_bucket(unique_name("secrets-"))
    secrets.ensure_bucket()
    secrets.put("private/face.png", png_bytes())
    message = refusal(resolver_for(object_store, tmp_path), f"s3://{secrets.bucket}/private/face.png")
    assert "IPAB_REFERENCE_BUCKETS" in message and object_store.bucket in message


def test_a_non_image_object_never_has_its_bytes_in_the_error(object_store: ObjectStore, tmp_path: Path) -> None:
    object_store.put("notes.png", SECRET_FILE)
    (tmp_path / "notes.png").write_bytes(SECRET_FILE)
    resolver = resolver_for(object_store, tmp_path)
    for raw in (f"s3://{object_store.bucket}/notes.png", str(tmp_path / "notes.png")):
        message = refusal(resolver, raw)
        assert "is not an image" in message and "PGPASS" not in message and "TopSe" not in message


def test_a_missing_object_and_a_missing_bucket_get_the_same_answer(object_store: ObjectStore, tmp_path: Path) -> None:
    gone = unique_name("gone-")
    resolver = resolver_for(object_store, tmp_path, buckets=(object_store.bucket, gone))
    missing_key = refusal(resolver, f"s3://{object_store.bucket}/none.png")
    missing_bucket = refusal(resolver, f"s3://{gone}/none.png")
    assert missing_key.replace(object_store.bucket, "B") == missing_bucket.replace(gone, "B")
    assert "does not exist or cannot be read" in missing_key


# 7. Bounded S3 reads; a bad bucket is one row's problem.


def test_an_object_too_large_is_refused_by_its_head_before_any_byte_is_read(
    object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    object_store.put("big.bin", b"x" * 1000)
    reads: list[Any] = []
    monkeypatch.setattr(object_store._client, "get_object", lambda **kw: reads.append(kw))
    with pytest.raises(ObjectTooLarge, match="1000 bytes"):
        object_store.get_bounded("big.bin", max_bytes=100)
    assert reads == []


def test_a_missing_bucket_in_one_row_is_that_rows_error_with_skip_invalid(settings: Settings, tmp_path: Path) -> None:
    photo = write_photos(tmp_path / "photos")["chelsea"]
    gone = unique_name("gone-")
    rows = [
        {"reference": str(photo), "prompt": "kept", "seed": 1, "width": 64, "height": 64},
        {"reference": f"s3://{gone}/a.png", "prompt": "bad", "seed": 2, "width": 64, "height": 64},
    ]
    allowed = settings.model_copy(
        update={"reference_roots": [tmp_path], "reference_buckets": [settings.s3_bucket, gone]}
    )
    result = submit_manifest(
        settings=allowed, path=write_jsonl(tmp_path / "m.jsonl", rows), model_set_name=MODEL_SET, skip_invalid=True
    )
    assert result.added == 1 and [(p.line, p.field) for p in result.invalid] == [(2, "reference")]


# 11. The manifest's own folder is allowed by default.


def test_a_manifest_reads_its_own_references_from_anywhere(
    settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    job = tmp_path / "data" / "job"
    write_photos(job / "refs")
    manifest = write_jsonl(job / "rows.jsonl", [{"reference": "refs/chelsea.png", "prompt": "p", "seed": 1}])
    elsewhere = tmp_path / "home"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    result = submit_manifest(settings=settings, path=manifest, model_set_name=MODEL_SET)
    assert result.added == 1


def test_a_refused_relative_reference_shows_where_it_resolved(object_store: ObjectStore, tmp_path: Path) -> None:
    resolver = ReferenceResolver(store=object_store, roots=[tmp_path / "allowed"], base_dir=tmp_path / "job")
    message = refusal(resolver, "../outside/a.png")
    assert str(tmp_path / "outside" / "a.png") in message and "IPAB_REFERENCE_ROOTS" in message


# 9. Decoded size is bounded from the header.


def png_header_only(width: int, height: int, color_type: int) -> bytes:
    """A PNG whose header claims `width` x `height` (color type 6: RGBA), with one tiny IDAT."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def test_an_image_too_large_once_decoded_is_refused_from_its_header() -> None:
    # 8000 x 8000 is under the pixel limit, but as RGBA it would take 244 MiB (and more to convert).
    with pytest.raises(InvalidInput, match="MiB once decoded"):
        decode_reference(png_header_only(8000, 8000, color_type=6))


def test_the_decoded_limit_counts_bytes_per_pixel_of_the_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    # At peak, L holds its 1 byte a pixel and its 4-byte RGB copy; RGBA its 4 and the RGB under it.
    monkeypatch.setattr("shared.images.MAX_DECODED_BYTES", 300 * 300 * 5 + DECODER_SLACK_BYTES)
    assert decode_reference(png_bytes((300, 300), "L")).size == (300, 300)  # 5 bytes per pixel: fits
    with pytest.raises(InvalidInput, match="once decoded"):
        decode_reference(png_bytes((300, 300), "RGBA"))  # 8 bytes per pixel: does not
    assert MAX_DECODED_BYTES >= 6000 * 4000 * 4 + DECODER_SLACK_BYTES  # a 24 MP RGB photo still decodes


# 10. Batch names.


@pytest.mark.parametrize("name", ["a\tb", "x\x1b[2Jy", "two\nlines", "rtl\u202eexe", " padded", "n" * 201])
def test_a_batch_name_that_would_break_listings_is_refused_at_submit(
    settings: Settings, tmp_path: Path, name: str
) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"reference": "a.png", "prompt": "p"}])
    with pytest.raises(InvalidInput, match="--batch"):
        submit_manifest(settings=settings, path=manifest, batch_name=name, model_set_name=MODEL_SET)


def test_listings_escape_a_name_stored_before_names_were_checked() -> None:
    assert printable("a\tb\x1b[2J") == "a\\tb\\x1b[2J"


# Tracebacks: an oversized CSV cell is a problem of its line.


def test_a_csv_cell_over_the_csv_limit_is_a_problem_of_its_line(tmp_path: Path) -> None:
    path = tmp_path / "m.csv"
    path.write_text(f'reference,prompt\na.png,ok\na.png,"{"x" * 200_000}"\n')
    problems = parse_manifest(path).problems
    assert [(p.line, p.field) for p in problems] == [(3, "csv")] and "field larger" in problems[0].reason


# retry --failed with Redis away changes nothing.


def test_retry_failed_without_redis_changes_nothing_and_says_so_in_one_line(
    settings: Settings,
    tmp_path: Path,
    settings_env: Callable[[Settings], dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    photo = write_photos(tmp_path / "photos")["chelsea"]
    rows = [{"reference": str(photo), "prompt": "p", "seed": 1, "width": 64, "height": 64}]
    allowed = settings.model_copy(update={"reference_roots": [tmp_path]})
    submit_manifest(
        settings=allowed, path=write_jsonl(tmp_path / "m.jsonl", rows), batch_name="r", model_set_name=MODEL_SET
    )
    with make_session_factory(make_engine(settings.database_url)).begin() as session:
        session.execute(update(Job).values(status=JobStatus.failed.value, error_type="X"))
    away = settings.model_copy(update={"redis_url": "redis://:pw0rd@127.0.0.1:1/0"})
    modules = ("scheduler.cli.batches", "scheduler.cli.ops")
    run: Run = run_ipab(["retry", "r", "--failed"], env=settings_env(away), monkeypatch=monkeypatch, modules=modules)
    assert run.code == 2 and "IPAB_REDIS_URL" in run.err and "pw0rd" not in run.err
    assert len(run.err.strip().splitlines()) == 1
    assert [j.status for j in load_jobs(settings)] == ["failed"]


# 8. One masking helper.


def test_masking_hides_passwords_in_every_kind_of_url() -> None:
    text = (
        "redis://:pw@h:6379/0 postgresql+psycopg://u:p@ss@db/x http://k:s@s3:9000 http://h:9000/x?X-Amz-Signature=abc"
    )
    masked = mask_text(text)
    assert masked == (
        "redis://:***@h:6379/0 postgresql+psycopg://u:***@db/x http://k:***@s3:9000 http://h:9000/x?X-Amz-Signature=***"
    )
