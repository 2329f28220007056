"""The state file of an export (`.ipab-export.json`): which jobs it holds, so the next run adds only new ones.

It is written last, after the data files: an export stopped half-way is repeated by the
next run (the same files are written again under the same names), never skipped.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Final

from scheduler.export.destination import Destination
from shared.errors import InvalidInput

STATE_FILE: Final = ".ipab-export.json"
STATE_VERSION: Final = 1


@dataclass
class ExportState:
    """What an output folder holds: the batch and format, the exported job ids, the next shard number."""

    batch_id: str
    format: str
    exported: set[str] = field(default_factory=set)
    next_shard: int = 0

    def to_json(self) -> dict[str, Any]:
        """The state as JSON (ids sorted, so the file is stable)."""
        return {
            "version": STATE_VERSION,
            "batch_id": self.batch_id,
            "format": self.format,
            "next_shard": self.next_shard,
            "exported_job_ids": sorted(self.exported),
        }


def load_state(dest: Destination, *, batch_id: str, format_name: str) -> ExportState:
    """The output's state; a fresh one if there is none; `InvalidInput` if it holds another export."""
    data = dest.read(STATE_FILE)
    if data is None:
        return ExportState(batch_id, format_name)
    try:
        raw = json.loads(data)
        state = ExportState(raw["batch_id"], raw["format"], set(raw["exported_job_ids"]), int(raw["next_shard"]))
    except (ValueError, KeyError, TypeError) as e:
        fix = f"is not an ipab export state ({e}); delete it to export everything again, or choose another --out"
        raise InvalidInput("--out", dest.describe(STATE_FILE), fix) from None
    if (state.batch_id, state.format) != (batch_id, format_name):
        fix = f"holds an export of batch {state.batch_id} as {state.format}; choose another --out for this one"
        raise InvalidInput("--out", dest.describe(), fix)
    return state


def save_state(dest: Destination, state: ExportState) -> None:
    """Write the state file (after every data file of the run)."""
    dest.write(STATE_FILE, (json.dumps(state.to_json(), indent=1) + "\n").encode())
