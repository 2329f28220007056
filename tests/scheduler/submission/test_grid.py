"""Grid files: `ipab expand` prints the cells as rows; `ipab submit grid.toml` submits them once."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from scheduler.submission.grid import cell_id, expand_lines, parse_grid, read_grid
from shared.errors import InvalidInput
from shared.settings import Settings
from tests.scheduler.submission.conftest import Run, load_jobs, queue_length, run_ipab, write_photos

MODEL_SET = "tiny-test"
GRID = """
batch = "grid-test"
[fixed]
width = 64
height = 64
steps = 2
[axes]
prompts = ["a watercolor", "a statue"]
references = ["photos/astronaut.png", ["photos/astronaut.png", "photos/coffee.jpg"]]
seeds = {count = 2, start = 10}
"""


def write_grid(folder: Path, text: str, name: str = "grid.toml") -> Path:
    path = folder / name
    path.write_text(text)
    return path


def rows_of(path: Path, **kwargs: int) -> list[dict[str, object]]:
    return [json.loads(line) for line in expand_lines(path, **kwargs)]


def test_axes_cross_in_file_order_with_the_last_varying_fastest(tmp_path: Path) -> None:
    rows = rows_of(write_grid(tmp_path, GRID))

    assert len(rows) == 2 * 2 * 2
    assert [(r["prompt"], r["reference"], r["seed"]) for r in rows[:3]] == [
        ("a watercolor", "photos/astronaut.png", 10),
        ("a watercolor", "photos/astronaut.png", 11),
        ("a watercolor", "photos/astronaut.png|photos/coffee.jpg", 10),
    ]
    assert all(r["width"] == 64 and r["steps"] == 2 for r in rows)
    assert len({r["id"] for r in rows}) == 8


def test_zipped_axes_walk_together_and_cross_the_others(tmp_path: Path) -> None:
    text = """
zip = [["prompts", "negative_prompts"]]
[axes]
prompts = ["cat", "dog"]
negative_prompts = ["blurry cat", "blurry dog"]
references = ["a.png"]
ip_adapter_scale = [0.4, "style"]
seeds = [1]
"""
    rows = rows_of(write_grid(tmp_path, text))

    assert [(r["prompt"], r["negative_prompt"], r["ip_adapter_scale"]) for r in rows] == [
        ("cat", "blurry cat", 0.4),
        ("cat", "blurry cat", "style"),
        ("dog", "blurry dog", 0.4),
        ("dog", "blurry dog", "style"),
    ]


def test_a_cell_id_depends_only_on_the_cell_values(tmp_path: Path) -> None:
    first = {r["id"]: r for r in rows_of(write_grid(tmp_path, GRID))}
    grown = GRID.replace('"a statue"]', '"a statue", "a robot"]').replace("count = 2", "count = 3")
    second = {r["id"]: r for r in rows_of(write_grid(tmp_path, grown, "grown.toml"))}

    assert set(first) < set(second) and len(second) == 3 * 2 * 3
    assert all(second[i] == row for i, row in first.items())
    assert cell_id({"a": 1, "b": 2}) == cell_id({"b": 2, "a": 1})


def test_a_grid_over_the_row_limit_is_refused_before_any_row_is_built(tmp_path: Path) -> None:
    path = write_grid(tmp_path, '[axes]\nprompts = ["a", "b"]\nreferences = ["r.png"]\nseeds = 1000000000000\n')

    with pytest.raises(InvalidInput) as info:
        parse_grid(path)

    message = str(info.value)
    assert str(path) in message and "axes" in message and "2,000,000,000,000 rows" in message
    assert "--max-rows 2000000000000" in message
    assert read_grid(path).row_count() == 2 * 10**12


@pytest.mark.parametrize(
    ("text", "field", "fix"),
    [
        ('[axes]\nprompt_list = ["a"]', "axes.prompt_list", "is not a job field"),
        ("[axes]\nprompts = []", "axes.prompts", "non-empty list"),
        ("[axes]\nseeds = -3", "axes.seeds", "count must be a whole number >= 1"),
        ('[axes]\nprompts = ["a"]\n[fixed]\nprompt = "b"', "fixed.prompt", "is also an axis"),
        ('zip = [["prompts", "seeds"]]\n[axes]\nprompts = ["a"]\nseeds = 2', "zip", "equal lengths"),
        ('batch = 3\n[axes]\nprompts = ["a"]', "batch", "must be a string"),
        ("[axes\nprompts =", "file", "is not valid TOML"),
        ('steps = 3\n[axes]\nprompts = ["a"]', "steps", "unknown key"),
    ],
)
def test_a_bad_grid_names_the_file_and_the_field_and_says_the_fix(
    tmp_path: Path, text: str, field: str, fix: str
) -> None:
    path = write_grid(tmp_path, text)

    with pytest.raises(InvalidInput) as info:
        read_grid(path)

    assert info.value.field == f"{path}: {field}" and fix in str(info.value)


def test_expand_prints_jsonl_and_the_count_on_stderr(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings_env: Callable[[Settings], dict[str, str]]
) -> None:
    path = write_grid(tmp_path, GRID)

    run = run_ipab(["expand", str(path)], env={}, monkeypatch=monkeypatch, modules=("scheduler.cli.grid",))

    assert run.code == 0
    assert [json.loads(line) for line in run.out.splitlines()] == rows_of(path)
    assert "= 8 row(s)" in run.err


@pytest.fixture
def grid_ipab(
    settings: Settings,
    tmp_path: Path,
    settings_env: Callable[[Settings], dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., Run]:
    env = settings_env(settings.model_copy(update={"reference_roots": [tmp_path]}))

    def run(*argv: str) -> Run:
        return run_ipab(argv, env=env, monkeypatch=monkeypatch, modules=("scheduler.cli.batches",))

    return run


def test_submitting_a_grid_then_a_grown_grid_adds_only_the_new_cells(
    grid_ipab: Callable[..., Run], settings: Settings, tmp_path: Path
) -> None:
    write_photos(tmp_path / "photos")
    path = write_grid(tmp_path, GRID)

    first = grid_ipab("submit", str(path), "--model-set", MODEL_SET)
    path.write_text(GRID.replace("count = 2", "count = 3"))
    second = grid_ipab("submit", str(path), "--model-set", MODEL_SET)

    assert first.code == 0 and second.code == 0, first.err + second.err
    assert first.out.splitlines()[0].endswith("= 8 row(s)") and "8 job(s) added" in first.out
    assert "4 job(s) added, 8 already in the batch" in second.out
    assert first.last_line == second.last_line  # the grid's `batch` names one batch
    jobs = load_jobs(settings)
    assert sorted(j.client_id or "" for j in jobs) == sorted(str(r["id"]) for r in rows_of(path))
    assert queue_length(settings, MODEL_SET) == 12


def test_submit_refuses_a_grid_over_max_rows_and_submits_nothing(
    grid_ipab: Callable[..., Run], settings: Settings, tmp_path: Path
) -> None:
    path = write_grid(tmp_path, GRID)

    run = grid_ipab("submit", str(path), "--model-set", MODEL_SET, "--max-rows", "5")

    assert run.code == 2 and "--max-rows 8" in run.err and str(path) in run.err
    assert load_jobs(settings) == []
