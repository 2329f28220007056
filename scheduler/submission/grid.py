"""Grid files: a TOML file of axes and fixed fields, expanded into manifest rows.

```toml
batch = "portraits-v1"              # optional; default: the file's name without .toml
expires_after = "30d"               # optional: how long the outputs are kept (shared/retention.py)
zip = [["prompts", "negative_prompts"]]   # optional: axes walked together, not crossed

[fixed]                             # every row gets these
width = 1024
steps = 30

[axes]                              # crossed in the order written (the last varies fastest)
prompts = ["a watercolor painting", "a bronze statue"]
negative_prompts = ["blurry", "lowres"]
references = ["refs/a.jpg", ["refs/a.jpg", "refs/b.png"]]   # a list entry is one job's several images
seeds = 4                           # seeds 0..3; or a list, or {count = 4, start = 1000}
ip_adapter_scale = [0.4, 0.8, "style"]
```

Each row's `id` is a hash of its cell (every field value of the row but its retention), so submitting the
grid again, or a grown grid, adds only the new cells. Rows are counted before any is
built: a grid over `DEFAULT_MAX_ROWS` is refused unless the caller raises the limit.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import tomllib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from scheduler.submission.defaults import DEFAULT_MAX_ROWS
from scheduler.submission.manifest import (
    COLUMNS,
    EXPIRES_FIELD,
    ID_FIELD,
    REFERENCE_FIELD,
    ParsedManifest,
    Problem,
    parse_rows,
)
from shared.errors import InvalidInput

GRID_SUFFIX: Final = ".toml"
CELL_ID_PREFIX: Final = "cell-"
CELL_ID_HEX_CHARS: Final = 24
TOP_LEVEL_KEYS: Final = ("batch", EXPIRES_FIELD, "zip", "fixed", "axes")
# Axis names may be plural; each names one manifest column.
AXIS_ALIASES: Final = {"prompts": "prompt", "negative_prompts": "negative_prompt", "references": REFERENCE_FIELD}
SEEDS_AXIS: Final = "seeds"
ALLOWED_FIELDS: Final = tuple(c for c in COLUMNS if c != ID_FIELD)


def is_grid(path: Path) -> bool:
    """Whether `path` names a grid file (by its `.toml` suffix)."""
    return path.suffix.lower() == GRID_SUFFIX


@dataclass(frozen=True)
class Grid:
    """A parsed grid: its axes (column -> values, in file order), zipped groups, fixed fields."""

    source: str
    batch: str | None
    axes: dict[str, Sequence[Any]]  # seeds from a count are a range: counted without being built
    groups: list[list[str]]  # each group is walked in lockstep; single axes are groups of one
    fixed: dict[str, Any]

    def row_count(self) -> int:
        """How many rows the grid expands to, computed without building any."""
        return math.prod(len(self.axes[group[0]]) for group in self.groups) if self.groups else 0

    def rows(self) -> Iterator[dict[str, Any]]:
        """The rows (as manifest rows, with their cell `id`), the last axis varying fastest."""
        per_group = [
            [{name: self.axes[name][i] for name in g} for i in range(len(self.axes[g[0]]))] for g in self.groups
        ]
        for combo in itertools.product(*per_group):
            row: dict[str, Any] = dict(self.fixed)
            for cell in combo:
                row.update(cell)
            yield {ID_FIELD: cell_id(row), **_as_manifest_row(row)}


def cell_id(row: Mapping[str, Any]) -> str:
    """`cell-<24 hex>`: the sha256 of the row's values as canonical JSON (order of keys ignored).

    Its retention is not part of it: a grid submitted again with another `expires_after` is the same cells.
    """
    cell = {name: value for name, value in row.items() if name != EXPIRES_FIELD}
    canonical = json.dumps(cell, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return CELL_ID_PREFIX + hashlib.sha256(canonical.encode()).hexdigest()[:CELL_ID_HEX_CHARS]


def _as_manifest_row(row: Mapping[str, Any]) -> dict[str, Any]:
    refs = row.get(REFERENCE_FIELD)
    if isinstance(refs, list):
        return {**row, REFERENCE_FIELD: "|".join(str(r) for r in refs)}
    return dict(row)


# Reading and checking the file.


def _bad(source: str, field: str, value: Any, fix: str) -> InvalidInput:
    return InvalidInput(f"{source}: {field}", value, fix)


def _column(source: str, table: str, key: str) -> str:
    name = AXIS_ALIASES.get(key, key)
    if name not in ALLOWED_FIELDS:
        allowed = ", ".join([*AXIS_ALIASES, SEEDS_AXIS, *ALLOWED_FIELDS] if table == "axes" else ALLOWED_FIELDS)
        raise _bad(source, f"{table}.{key}", key, f"is not a job field; {table} may name: {allowed}")
    return name


def _seeds(source: str, value: Any) -> Sequence[Any]:
    if isinstance(value, list):
        return value
    if isinstance(value, dict) and set(value) <= {"count", "start"} and "count" in value:
        count, start = value["count"], value.get("start", 0)
    elif isinstance(value, int) and not isinstance(value, bool):
        count, start = value, 0
    else:
        fix = "write a list of seeds, a count (seeds = 4 gives 0..3) or {count = 4, start = 1000}"
        raise _bad(source, "axes.seeds", value, fix)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (count, start)) or count < 1 or start < 0:
        raise _bad(source, "axes.seeds", value, "count must be a whole number >= 1 and start >= 0")
    return range(start, start + count)


def _axes(source: str, table: Any) -> dict[str, Sequence[Any]]:
    if not isinstance(table, dict) or not table:
        raise _bad(source, "axes", table, "must be a table of at least one axis, e.g. [axes] prompts = ['a', 'b']")
    axes: dict[str, Sequence[Any]] = {}
    for axis, values in table.items():
        name = "seed" if axis == SEEDS_AXIS else _column(source, "axes", axis)
        values = _seeds(source, values) if name == "seed" else values
        if not isinstance(values, list | range) or not values:
            raise _bad(source, f"axes.{axis}", values, "must be a non-empty list of values, e.g. [0.4, 0.8]")
        if name in axes:
            raise _bad(source, f"axes.{axis}", axis, f"repeats the axis of {name!r}; give each field one axis")
        axes[name] = values
    return axes


def _fixed(source: str, table: Any, axes: Mapping[str, Any]) -> dict[str, Any]:
    if table is None:
        return {}
    if not isinstance(table, dict):
        raise _bad(source, "fixed", table, "must be a table of field = value, e.g. [fixed] steps = 30")
    fixed: dict[str, Any] = {}
    for key, value in table.items():
        name = _column(source, "fixed", key)
        if name in axes:
            raise _bad(source, f"fixed.{key}", value, f"is also an axis; keep {name!r} in [axes] or in [fixed]")
        fixed[name] = value
    return fixed


def _groups(source: str, value: Any, axes: Mapping[str, Sequence[Any]]) -> list[list[str]]:
    zipped = [] if value is None else value
    if not isinstance(zipped, list) or not all(isinstance(g, list) and len(g) >= 2 for g in zipped):
        raise _bad(source, "zip", value, "must be a list of axis lists, e.g. zip = [['prompts', 'seeds']]")
    groups: list[list[str]] = []
    for group in zipped:
        names = ["seed" if a == SEEDS_AXIS else AXIS_ALIASES.get(a, a) for a in group]
        missing = [a for a, n in zip(group, names, strict=True) if n not in axes]
        if missing or any(n in g for g in groups for n in names):
            raise _bad(source, "zip", group, "must name axes of [axes], each in one zip group at most")
        lengths = {a: len(axes[n]) for a, n in zip(group, names, strict=True)}
        if len(set(lengths.values())) > 1:
            raise _bad(source, "zip", group, f"zipped axes need equal lengths, these have {lengths}")
        groups.append(names)
    zipped_names = {n for g in groups for n in g}
    groups.extend([name] for name in axes if name not in zipped_names)
    return groups


def read_grid(path: Path) -> Grid:
    """Read and check a grid file; `InvalidInput` naming the file and the field otherwise."""
    source = str(path)
    try:
        doc = tomllib.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise _bad(source, "file", source, f"cannot be read ({e.strerror}); check the path") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise _bad(source, "file", source, f"is not valid TOML ({e}); fix the syntax") from None
    unknown = [k for k in doc if k not in TOP_LEVEL_KEYS]
    if unknown:
        raise _bad(source, unknown[0], doc[unknown[0]], f"unknown key; a grid has {', '.join(TOP_LEVEL_KEYS)}")
    batch = doc.get("batch")
    if batch is not None and not isinstance(batch, str):
        raise _bad(source, "batch", batch, "must be a string (the batch name)")
    axes = _axes(source, doc.get("axes"))
    fixed = _fixed(source, doc.get("fixed"), axes)
    if EXPIRES_FIELD in doc:  # the grid's retention: every row's, checked with the rows
        fixed.setdefault(EXPIRES_FIELD, doc[EXPIRES_FIELD])
    return Grid(source, batch, axes, _groups(source, doc.get("zip"), axes), fixed)


def check_row_count(grid: Grid, *, max_rows: int) -> int:
    """The grid's row count; `InvalidInput` when it is over `max_rows` (counted, not expanded)."""
    count = grid.row_count()
    if count > max_rows:
        sizes = " x ".join(str(len(grid.axes[g[0]])) for g in grid.groups)
        fix = f"{sizes} = {count:,} rows is over the limit of {max_rows:,}; pass --max-rows {count} to allow it"
        raise _bad(grid.source, "axes", count, fix)
    return count


def grid_batch_name(path: Path) -> str:
    """The grid's `batch`, else its file name without `.toml`: a grown grid joins its batch."""
    return read_grid(path).batch or path.stem


def parse_grid(
    path: Path, *, defaults: Mapping[str, Any] | None = None, max_rows: int = DEFAULT_MAX_ROWS
) -> ParsedManifest:
    """The grid's rows, validated as manifest rows (line N is the N-th cell)."""
    grid = read_grid(path)
    check_row_count(grid, max_rows=max_rows)
    raw_rows: Iterator[tuple[int, Mapping[str, Any] | Problem]] = enumerate(grid.rows(), start=1)
    return parse_rows(raw_rows, defaults=defaults, source=repr(str(path)))


def expand_lines(path: Path, *, max_rows: int = DEFAULT_MAX_ROWS) -> Iterator[str]:
    """The grid's rows as JSONL lines (without a trailing newline), for `ipab expand`."""
    grid = read_grid(path)
    check_row_count(grid, max_rows=max_rows)
    for row in grid.rows():
        yield json.dumps(row, ensure_ascii=False)


def axis_sizes(grid: Grid) -> Sequence[tuple[str, int]]:
    """(axis or zipped axes, number of values) per group, as `ipab submit` reports a grid."""
    return [("+".join(g), len(grid.axes[g[0]])) for g in grid.groups]
