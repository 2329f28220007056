"""The plan commands' defaults that their parsers show (`ipab plans history --limit`, `ipab beat --interval`).

Apart from the modules that use them, which load SQL and cron code, so that the CLI's
parsers and `ipab --help` load neither.
"""

from __future__ import annotations

from typing import Final

HISTORY_LIMIT: Final = 50  # slots shown, newest first, by `ipab plans history` and the API's history
DEFAULT_INTERVAL_S: Final = 5.0  # seconds between two passes of `ipab beat`
