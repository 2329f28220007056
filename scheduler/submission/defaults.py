"""The submission defaults that the commands' parsers show (`ipab submit --max-rows`, `ipab expand --max-rows`).

Apart from the grid and manifest code that uses them, so that the CLI's parsers and
`ipab --help` load neither.
"""

from __future__ import annotations

from typing import Final

DEFAULT_MAX_ROWS: Final = 1_000_000  # rows a grid may expand to unless the caller raises the limit
