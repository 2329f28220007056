"""Reading manifests: JSONL and CSV alike, strict numbers, defaults, seeds, dedupe keys, problems."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from scheduler.submission.manifest import Problem, parse_defaults, parse_manifest
from shared.errors import InvalidInput
from tests.scheduler.submission.conftest import write_csv, write_jsonl


def test_jsonl_and_csv_rows_with_equal_values_are_equal_jobs(tmp_path: Path) -> None:
    jsonl = write_jsonl(tmp_path / "m.jsonl", [{"reference": "a.png", "prompt": "cat", "seed": 7, "steps": 20}])
    csv = write_csv(tmp_path / "m.csv", ["reference", "prompt", "seed", "steps"], [["a.png", "cat", "7", "20"]])

    from_jsonl, from_csv = parse_manifest(jsonl).rows, parse_manifest(csv).rows

    assert from_jsonl[0].params == from_csv[0].params
    assert from_jsonl[0].dedupe_key == from_csv[0].dedupe_key
    assert from_csv[0].line == 2  # line 1 is the header


def test_csv_numbers_are_converted_strictly_and_empty_cells_are_absent(tmp_path: Path) -> None:
    header = ["reference", "prompt", "seed", "guidance_scale", "negative_prompt"]
    csv = write_csv(tmp_path / "m.csv", header, [["a.png", "x", "4.2", "7", ""], ["a.png", "x", "", " 3.5 ", ""]])

    parsed = parse_manifest(csv)

    assert parsed.problems == [Problem(2, "seed", parsed.problems[0].reason)]
    assert "'4.2'" in parsed.problems[0].reason
    assert parsed.rows[0].params.guidance_scale == 3.5 and parsed.rows[0].params.negative_prompt == ""


def test_a_quoted_multi_line_csv_cell_keeps_later_line_numbers_right(tmp_path: Path) -> None:
    csv = write_csv(
        tmp_path / "m.csv", ["reference", "prompt", "steps"], [["a.png", "two\nlines", "5"], ["a.png", "x", "0"]]
    )

    parsed = parse_manifest(csv)

    assert parsed.rows[0].params.prompt == "two\nlines"
    assert [(p.line, p.field) for p in parsed.problems] == [(4, "steps")]


def test_set_defaults_apply_to_every_row_and_row_values_win(tmp_path: Path) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"reference": "a.png", "prompt": "x"}, {"prompt": "y", "steps": 9}])

    rows = parse_manifest(manifest, defaults=parse_defaults(["steps=3", "reference=b.png", "guidance_scale=2"])).rows

    assert [(r.references, r.params.steps, r.params.guidance_scale) for r in rows] == [
        (("a.png",), 3, 2.0),
        (("b.png",), 9, 2.0),
    ]


@pytest.mark.parametrize("pair", ["steps", "colour=red", "id=7"])
def test_set_refuses_what_is_not_a_known_key_value_pair(pair: str) -> None:
    with pytest.raises(InvalidInput, match="--set"):
        parse_defaults([pair])


def test_absent_seeds_are_drawn_and_identical_rows_stay_separate_jobs(tmp_path: Path) -> None:
    manifest = write_jsonl(tmp_path / "m.jsonl", [{"reference": "a.png", "prompt": "x"}] * 2)

    first, again = parse_manifest(manifest).rows, parse_manifest(manifest).rows

    assert first[0].params.seed != first[1].params.seed
    assert all(0 <= r.params.seed < 2**63 for r in first)
    assert first[0].dedupe_key != first[1].dedupe_key
    assert [r.dedupe_key for r in first] == [r.dedupe_key for r in again]


def test_a_client_id_is_the_dedupe_key_and_may_appear_once(tmp_path: Path) -> None:
    rows = [{"reference": "a.png", "prompt": "x", "id": "k1"}, {"reference": "b.png", "prompt": "y", "id": "k1"}]
    parsed = parse_manifest(write_jsonl(tmp_path / "m.jsonl", rows))
    renamed = parse_manifest(write_jsonl(tmp_path / "n.jsonl", [{**rows[0], "prompt": "changed"}]))

    assert [(p.line, p.field) for p in parsed.problems] == [(2, "id")]
    assert "duplicate of line 1" in parsed.problems[0].reason
    assert parsed.rows[0].client_id == "k1"
    assert renamed.rows[0].dedupe_key == parsed.rows[0].dedupe_key


def test_every_bad_field_of_every_row_is_reported(tmp_path: Path) -> None:
    rows: list[dict[str, Any]] = [
        {"reference": "a.png", "prompt": "ok"},
        {"reference": "a.png", "prompt": 5, "width": 1001, "steps": 0, "colour": "red"},
        {"prompt": "no reference"},
    ]
    parsed = parse_manifest(write_jsonl(tmp_path / "m.jsonl", rows))

    assert len(parsed.rows) == 1
    assert sorted((p.line, p.field) for p in parsed.problems) == [
        (2, "colour"),
        (2, "prompt"),
        (2, "steps"),
        (2, "width"),
        (3, "reference"),
    ]
    assert parsed.unchecked_references == {2: ("a.png",)}


def test_blank_lines_are_skipped_but_counted(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(
        '\n{"reference": "a.png", "prompt": "x"}\n\n{"reference": "a.png", "prompt": "x", "steps": -1}\n'
    )

    parsed = parse_manifest(manifest)

    assert [r.line for r in parsed.rows] == [2]
    assert [p.line for p in parsed.problems] == [4]


def test_a_manifest_without_a_known_suffix_is_read_by_its_first_character(tmp_path: Path) -> None:
    (tmp_path / "rows.txt").write_text('{"reference": "a.png", "prompt": "x"}\n')
    (tmp_path / "table.txt").write_text("reference,prompt\na.png,x\n")

    assert len(parse_manifest(tmp_path / "rows.txt").rows) == 1
    assert len(parse_manifest(tmp_path / "table.txt").rows) == 1


def test_a_missing_manifest_file_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="manifest"):
        parse_manifest(tmp_path / "nope.jsonl")
