"""The bad-input corpus: each kind is refused at the edge naming its line, field and reason.

Every case is a manifest with one bad row between two good ones (or a bad file as a whole).
`ipab submit` must exit 2 and write nothing; with `--skip-invalid` exactly the good rows
are submitted. Unusual but valid images (16-bit, CMYK, palette, alpha, greyscale) are
accepted and converted to RGB, not refused.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import os
import pathlib
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

from shared.images import decode_reference
from shared.keys import ref_key
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.scheduler.submission.conftest import (
    Run,
    count_rows,
    load_jobs,
    queue_length,
    run_ipab,
    write_csv,
    write_jsonl,
)

MODEL_SET = "tiny-test"
GOOD: dict[str, Any] = {"reference": "good.png", "prompt": "fine", "width": 512, "height": 512, "steps": 4}
CSV_HEADER = ["reference", "prompt", "seed", "guidance_scale"]


@dataclass(frozen=True)
class Ctx:
    """Where a case writes: the allowed folder (holding good.png and the manifest), a file outside it."""

    folder: Path
    outside: Path
    bucket: str
    monkeypatch: pytest.MonkeyPatch


@dataclass(frozen=True)
class Case:
    """A bad manifest and what the refusal must name. `valid_lines`: the rows --skip-invalid keeps."""

    manifest: Path
    field: str
    reason: str
    line: int = 2
    valid_lines: tuple[int, ...] = (1, 3)


def between_good_rows(ctx: Ctx, bad: dict[str, Any] | str) -> Path:
    """A JSONL manifest: a good row, the bad row (line 2), another good row."""
    return write_jsonl(ctx.folder / "m.jsonl", [{**GOOD, "prompt": "fine 1"}, bad, {**GOOD, "prompt": "fine 3"}])


def bad_row(field: str, reason: str, **values: Any) -> Callable[[Ctx], Case]:
    """A case whose bad row is the good row with `values` changed (None removes a column)."""

    def build(ctx: Ctx) -> Case:
        row = {k: v for k, v in {**GOOD, **values}.items() if v is not None}
        return Case(between_good_rows(ctx, row), field, reason)

    return build


def bad_line(field: str, reason: str, text: str) -> Callable[[Ctx], Case]:
    """A case whose line 2 is `text` as written."""
    return lambda ctx: Case(between_good_rows(ctx, text), field, reason)


def bad_file(name: str, data: bytes, reason: str) -> Callable[[Ctx], Case]:
    """A case whose bad row refers to a file `name` holding `data`."""

    def build(ctx: Ctx) -> Case:
        (ctx.folder / name).write_bytes(data)
        return Case(between_good_rows(ctx, {**GOOD, "reference": name}), "reference", reason)

    return build


def png_bytes(width: int, height: int, *, bit_depth: int = 8, colour_type: int = 2, rows: bytes = b"") -> bytes:
    """A PNG written by hand, so its header can claim any size."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    idat = zlib.compress(rows or b"\0" * 64, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def encoded(image: Image.Image, fmt: str) -> bytes:
    """`image` saved as `fmt`."""
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    return buffer.getvalue()


@functools.cache
def _chelsea() -> bytes:
    from skimage import data

    return encoded(Image.fromarray(data.chelsea()), "PNG")  # type: ignore[no-untyped-call]


def photo() -> Image.Image:
    """scikit-image's cat photo."""
    return Image.open(io.BytesIO(_chelsea()))


def decompression_bomb() -> bytes:
    """A real 12000 x 12000 black PNG: 144 megapixels in a few kilobytes."""
    row = b"\0" + b"\0" * (12000 // 8)
    return png_bytes(12000, 12000, bit_depth=1, colour_type=0, rows=row * 12000)


# --- Cases built from files ----------------------------------------------------------------------------


def missing_path(ctx: Ctx) -> Case:
    return Case(between_good_rows(ctx, {**GOOD, "reference": "nope.png"}), "reference", "does not exist")


def unreadable_path(ctx: Ctx) -> Case:
    locked = ctx.folder / "locked.png"
    locked.write_bytes((ctx.folder / "good.png").read_bytes())
    locked.chmod(0)
    if os.geteuid() == 0:  # root reads anything: stand in for the kernel's refusal
        real_open = pathlib.Path.open

        def refusing_open(self: Path, *args: Any, **kwargs: Any) -> Any:
            if self == locked:
                raise PermissionError(13, "Permission denied", str(self))
            return real_open(self, *args, **kwargs)

        ctx.monkeypatch.setattr(pathlib.Path, "open", refusing_open)
    return Case(between_good_rows(ctx, {**GOOD, "reference": "locked.png"}), "reference", "Permission denied")


def directory_path(ctx: Ctx) -> Case:
    (ctx.folder / "dir.png").mkdir()
    return Case(between_good_rows(ctx, {**GOOD, "reference": "dir.png"}), "reference", "not a regular file")


def fifo_path(ctx: Ctx) -> Case:
    os.mkfifo(ctx.folder / "pipe.png")  # reading it would block forever
    return Case(between_good_rows(ctx, {**GOOD, "reference": "pipe.png"}), "reference", "not a regular file")


def dangling_symlink(ctx: Ctx) -> Case:
    (ctx.folder / "gone.png").symlink_to(ctx.folder / "deleted.png")
    return Case(between_good_rows(ctx, {**GOOD, "reference": "gone.png"}), "reference", "does not exist")


def symlink_escaping_roots(ctx: Ctx) -> Case:
    (ctx.folder / "link.png").symlink_to(ctx.outside)
    return Case(between_good_rows(ctx, {**GOOD, "reference": "link.png"}), "reference", "outside the allowed folders")


def dotdot_escaping_roots(ctx: Ctx) -> Case:
    row = {**GOOD, "reference": f"../{ctx.outside.name}"}
    return Case(between_good_rows(ctx, row), "reference", "outside the allowed folders")


def absolute_path_outside_roots(ctx: Ctx) -> Case:
    row = {**GOOD, "reference": str(ctx.outside)}
    return Case(between_good_rows(ctx, row), "reference", "outside the allowed folders")


def missing_file_outside_roots_does_not_say_it_is_missing(ctx: Ctx) -> Case:
    row = {**GOOD, "reference": "/etc/no-such-file.png"}
    return Case(between_good_rows(ctx, row), "reference", "outside the allowed folders")


def truncated_png(ctx: Ctx) -> Case:
    data = _chelsea()
    return bad_file("cut.png", data[: len(data) // 2], "cannot be decoded")(ctx)


def truncated_jpeg(ctx: Ctx) -> Case:
    data = encoded(photo(), "JPEG")
    return bad_file("cut.jpg", data[: len(data) // 2], "cannot be decoded")(ctx)


def s3_reference_missing(ctx: Ctx) -> Case:
    row = {**GOOD, "reference": f"s3://{ctx.bucket}/incoming/nope.png"}
    return Case(between_good_rows(ctx, row), "reference", "does not exist")


def s3_reference_without_key(ctx: Ctx) -> Case:
    row = {**GOOD, "reference": f"s3://{ctx.bucket}"}
    return Case(between_good_rows(ctx, row), "reference", "needs both a bucket and a key")


# --- Cases of whole manifests ---------------------------------------------------------------------------


def duplicate_client_id(ctx: Ctx) -> Case:
    rows = [{**GOOD, "id": "k1"}, {**GOOD, "prompt": "other", "id": "k1"}, {**GOOD, "prompt": "fine 3"}]
    return Case(write_jsonl(ctx.folder / "m.jsonl", rows), "id", "duplicate of line 1")


def not_utf8(ctx: Ctx) -> Case:
    manifest = between_good_rows(ctx, {**GOOD, "prompt": "cafe"})
    manifest.write_bytes(manifest.read_bytes().replace(b'"cafe"', b'"caf\xe9"'))
    return Case(manifest, "manifest", "not UTF-8")


def csv_wrong_header(ctx: Ctx) -> Case:
    manifest = write_csv(ctx.folder / "m.csv", ["image", "prompt"], [["good.png", "fine"]])
    return Case(manifest, "image", "unknown column", line=1, valid_lines=())


def csv_missing_required_column(ctx: Ctx) -> Case:
    manifest = write_csv(ctx.folder / "m.csv", ["prompt", "seed"], [["fine", "1"]])
    return Case(manifest, "reference", "required column missing", line=1, valid_lines=())


def csv_row_with_extra_cells(ctx: Ctx) -> Case:
    rows = [["good.png", "fine 2", "", ""], ["good.png", "x", "1", "5", "surplus"], ["good.png", "fine 4", "", ""]]
    return Case(write_csv(ctx.folder / "m.csv", CSV_HEADER, rows), "csv", "5 cells", line=3, valid_lines=(2, 4))


def csv_seed_with_a_fraction(ctx: Ctx) -> Case:
    rows = [["good.png", "fine 2", "", ""], ["good.png", "x", "4.2", ""], ["good.png", "fine 4", "", ""]]
    return Case(write_csv(ctx.folder / "m.csv", CSV_HEADER, rows), "seed", "whole number", line=3, valid_lines=(2, 4))


def csv_guidance_nan(ctx: Ctx) -> Case:
    rows = [["good.png", "fine 2", "", ""], ["good.png", "x", "", "nan"], ["good.png", "fine 4", "", ""]]
    manifest = write_csv(ctx.folder / "m.csv", CSV_HEADER, rows)
    return Case(manifest, "guidance_scale", "finite", line=3, valid_lines=(2, 4))


def empty_manifest(ctx: Ctx) -> Case:
    manifest = ctx.folder / "m.jsonl"
    manifest.write_text("")
    return Case(manifest, "manifest", "has no rows", line=1, valid_lines=())


def blank_lines_only(ctx: Ctx) -> Case:
    manifest = ctx.folder / "m.jsonl"
    manifest.write_text("\n  \n\n")
    return Case(manifest, "manifest", "has no rows", line=1, valid_lines=())


GOOD_LINE = json.dumps(GOOD)[:-1]  # the good row's JSON, open for one more field

BAD_INPUT: dict[str, Callable[[Ctx], Case]] = {
    # references: paths
    "missing_path": missing_path,
    "unreadable_path": unreadable_path,
    "directory_path": directory_path,
    "fifo_path": fifo_path,
    "dangling_symlink": dangling_symlink,
    "symlink_escaping_roots": symlink_escaping_roots,
    "dotdot_escaping_roots": dotdot_escaping_roots,
    "absolute_path_outside_roots": absolute_path_outside_roots,
    "missing_file_outside_roots": missing_file_outside_roots_does_not_say_it_is_missing,
    "reference_missing": bad_row("reference", "is required", reference=None),
    "reference_not_a_string": bad_row("reference", "path or s3:// URI", reference=5),
    "reference_empty_entry": bad_row("reference", "empty entry", reference="good.png||good.png"),
    "too_many_references": bad_row("reference", "at most 8", reference="|".join(["good.png"] * 9)),
    "s3_reference_missing": s3_reference_missing,
    "s3_reference_without_key": s3_reference_without_key,
    # references: contents
    "truncated_png": truncated_png,
    "truncated_jpeg": truncated_jpeg,
    "text_file_named_png": bad_file("notes.png", b"these are my notes, not an image\n", "not an image"),
    "zero_byte_file": bad_file("empty.png", b"", "empty file"),
    "decompression_bomb": lambda ctx: bad_file("bomb.png", decompression_bomb(), "decompression bomb")(ctx),
    "huge_declared_dimensions": bad_file("huge.png", png_bytes(10_000, 7_000), "more than 67108864 pixels"),
    "absurd_declared_dimensions": bad_file("absurd.png", png_bytes(100_000, 100_000), "decompression bomb"),
    "image_too_small": lambda ctx: bad_file("tiny.png", encoded(photo().resize((4, 4)), "PNG"), "sides must be")(ctx),
    # parameters
    "width_not_multiple_of_8": bad_row("width", "multiple of 8", width=1001),
    "width_huge": bad_row("width", "from 64 to 2048", width=100_000),
    "height_too_small": bad_row("height", "from 64 to 2048", height=16),
    "steps_zero": bad_row("steps", "from 1 to 150", steps=0),
    "steps_10000": bad_row("steps", "from 1 to 150", steps=10_000),
    "steps_true": bad_row("steps", "whole number", steps=True),
    "guidance_nan": bad_line("guidance_scale", "finite", GOOD_LINE + ', "guidance_scale": NaN}'),
    "guidance_inf": bad_line("guidance_scale", "finite", GOOD_LINE + ', "guidance_scale": Infinity}'),
    "guidance_negative": bad_row("guidance_scale", "finite number from 0.0", guidance_scale=-1),
    "seed_negative": bad_row("seed", "0 <= seed < 2**63", seed=-1),
    "seed_2_to_the_63": bad_row("seed", "0 <= seed < 2**63", seed=2**63),
    "seed_float": bad_row("seed", "whole number", seed=4.2),
    "seed_string": bad_row("seed", "whole number", seed="42"),
    "prompt_not_a_string": bad_row("prompt", "must be a string", prompt=42),
    "prompt_a_list": bad_row("prompt", "must be a string", prompt=["a", "cat"]),
    "prompt_missing": bad_row("prompt", "is required", prompt=None),
    "prompt_too_long": bad_row("prompt", "at most 2000 characters", prompt="x" * 2001),
    "prompt_control_character": bad_row("prompt", "control character", prompt="a cat\x07"),
    "negative_prompt_not_a_string": bad_row("negative_prompt", "must be a string", negative_prompt={"no": 1}),
    "unknown_scheduler": bad_row("scheduler", "must be one of", scheduler="turbo"),
    "adapter_scale_unknown_preset": bad_row("ip_adapter_scale", "must be a number", ip_adapter_scale="strong"),
    "adapter_scale_out_of_range": bad_row("ip_adapter_scale", "from 0.0 to 2.0", ip_adapter_scale=5),
    "adapter_scale_unknown_block": bad_row(
        "ip_adapter_scale.up.block_9", "unknown", ip_adapter_scale={"up": {"block_9": 1}}
    ),
    # rows and files
    "unknown_column": bad_row("colour", "unknown column", colour="red"),
    "duplicate_client_id": duplicate_client_id,
    "client_id_not_a_string": bad_row("id", "must be a string", id=["k"]),
    "malformed_json_line": bad_line("json", "not valid JSON", '{"reference": "good.png", "prompt": '),
    "json_line_not_an_object": bad_line("json", "must be one JSON object", "[1, 2]"),
    "json_key_twice": bad_line("json", "appears twice", '{"reference": "good.png", "prompt": "a", "prompt": "b"}'),
    "not_utf8": not_utf8,
    "csv_wrong_header": csv_wrong_header,
    "csv_missing_required_column": csv_missing_required_column,
    "csv_row_with_extra_cells": csv_row_with_extra_cells,
    "csv_seed_with_a_fraction": csv_seed_with_a_fraction,
    "csv_guidance_nan": csv_guidance_nan,
    "empty_manifest": empty_manifest,
    "blank_lines_only": blank_lines_only,
}


@pytest.fixture
def ctx(tmp_path: Path, object_store: ObjectStore, monkeypatch: pytest.MonkeyPatch) -> Ctx:
    folder = tmp_path / "allowed"
    folder.mkdir()
    (folder / "good.png").write_bytes(_chelsea())
    outside = tmp_path / "outside.png"
    outside.write_bytes(_chelsea())
    return Ctx(folder=folder, outside=outside, bucket=object_store.bucket, monkeypatch=monkeypatch)


@pytest.fixture
def corpus_settings(settings: Settings, ctx: Ctx) -> Settings:
    return settings.model_copy(update={"reference_roots": [ctx.folder]})


@pytest.fixture
def ipab(
    corpus_settings: Settings, settings_env: Callable[[Settings], dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> Callable[..., Run]:
    def run(*argv: str) -> Run:
        return run_ipab(argv, env=settings_env(corpus_settings), monkeypatch=monkeypatch)

    return run


def test_the_corpus_holds_at_least_30_kinds_of_bad_input() -> None:
    assert len(BAD_INPUT) >= 30


@pytest.mark.parametrize("kind", list(BAD_INPUT), ids=list(BAD_INPUT))
def test_bad_input_is_refused_naming_line_and_field_and_valid_rows_survive_skip_invalid(
    kind: str, ctx: Ctx, ipab: Callable[..., Run], corpus_settings: Settings
) -> None:
    case = BAD_INPUT[kind](ctx)

    refused = ipab("submit", str(case.manifest), "--batch", "b", "--model-set", MODEL_SET)

    prefix = f"line {case.line}: {case.field}: "
    problems = [line for line in refused.err.splitlines() if line.startswith(prefix)]
    assert refused.code == 2, refused.out + refused.err
    assert problems and case.reason in problems[0], refused.err
    assert count_rows(corpus_settings) == (0, 0)
    assert queue_length(corpus_settings, MODEL_SET) == 0

    kept = ipab("submit", str(case.manifest), "--batch", "b", "--model-set", MODEL_SET, "--skip-invalid")

    assert kept.code == (0 if case.valid_lines else 2), kept.err
    assert [job.line for job in load_jobs(corpus_settings)] == list(case.valid_lines)
    assert queue_length(corpus_settings, MODEL_SET) == len(case.valid_lines)


def sixteen_bit_png() -> bytes:
    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16).astype(np.uint16)
    image = Image.fromarray(ramp)
    assert image.mode == "I;16"
    return encoded(image, "PNG")


ODD_BUT_VALID: dict[str, Callable[[], tuple[bytes, str]]] = {
    "16_bit_png": lambda: (sixteen_bit_png(), "png"),
    "cmyk_jpeg": lambda: (encoded(photo().convert("CMYK"), "JPEG"), "jpg"),
    "palette_png": lambda: (encoded(photo().convert("P"), "PNG"), "png"),
    "rgba_png_with_transparency": lambda: (encoded(photo().convert("RGBA"), "PNG"), "png"),
    "greyscale_jpeg": lambda: (encoded(photo().convert("L"), "JPEG"), "jpg"),
    "webp": lambda: (encoded(photo(), "WEBP"), "webp"),
}


@pytest.mark.parametrize("kind", list(ODD_BUT_VALID), ids=list(ODD_BUT_VALID))
def test_unusual_but_valid_images_are_accepted_and_decode_to_rgb(
    kind: str, ctx: Ctx, ipab: Callable[..., Run], corpus_settings: Settings, object_store: ObjectStore
) -> None:
    data, ext = ODD_BUT_VALID[kind]()
    (ctx.folder / f"odd.{ext}").write_bytes(data)
    manifest = between_good_rows(ctx, {**GOOD, "reference": f"odd.{ext}"})

    run = ipab("submit", str(manifest), "--model-set", MODEL_SET)

    assert run.code == 0, run.err
    assert [job.line for job in load_jobs(corpus_settings)] == [1, 2, 3]
    stored = object_store.get(ref_key(hashlib.sha256(data).hexdigest(), ext))
    assert stored == data
    assert decode_reference(stored).mode == "RGB"
