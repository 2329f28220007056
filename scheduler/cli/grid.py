"""`ipab expand grid.toml`: a grid file's rows as JSONL on stdout (`ipab submit grid.toml` submits them)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from scheduler.submission.defaults import DEFAULT_MAX_ROWS


def grid_summary(path: Path, *, max_rows: int) -> str:
    """`grid g.toml: prompt 2 x seed 4 = 8 rows` (refused over `max_rows`, before any row is built)."""
    from scheduler.submission.grid import axis_sizes, check_row_count, read_grid

    grid = read_grid(path)
    count = check_row_count(grid, max_rows=max_rows)
    sizes = " x ".join(f"{name} {size}" for name, size in axis_sizes(grid))
    return f"grid {path}: {sizes} = {count} row(s)"


def cmd_expand(args: argparse.Namespace) -> int:
    """Print every row of the grid as one JSON line (with its cell `id`); the count goes to stderr."""
    from scheduler.submission.grid import expand_lines

    path = Path(args.grid)
    print(grid_summary(path, max_rows=args.max_rows), file=sys.stderr)
    for line in expand_lines(path, max_rows=args.max_rows):
        sys.stdout.write(line + "\n")
    return 0


def add_max_rows(parser: argparse.ArgumentParser) -> None:
    """The `--max-rows` option shared by `expand` and `submit`."""
    parser.add_argument(
        "--max-rows",
        type=int,
        default=DEFAULT_MAX_ROWS,
        help=f"refuse a grid with more rows than this (default {DEFAULT_MAX_ROWS:,})",
    )


def register(subparsers: Any) -> None:
    """Add `expand`."""
    expand = subparsers.add_parser("expand", help="print a grid file's rows as JSONL")
    expand.add_argument("grid", help="a grid .toml file (axes and fixed fields)")
    add_max_rows(expand)
    expand.set_defaults(func=cmd_expand)
