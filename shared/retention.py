"""How long a job's outputs are kept: durations as people write them, and which retention applies.

A retention is written `1h`, `7d`, `30d`, `12w`, `1y` (or a number of seconds), from one hour
to ten years, or `never` (kept for ever). The outputs of a job are kept for its retention
counted from the moment it finishes (Replicate and OpenAI's Batch count from completion
too); then the janitor (`shared.janitor`) removes them.

Which retention a job gets is decided once, at submission, by the first that is given of:
the row's `expires_after`, the submission's (`ipab submit --expires-after`, a grid's or a
plan's `expires_after`, `POST /v1/batches?expires_after=`), the tenant's default
(`ipab tenants set NAME --expires-after`), and the fleet's (IPAB_RETENTION_OUTPUTS_S;
unset: for ever). A job records the result in `jobs.expires_after_s` (NULL: for ever), so a
later change of a default never shortens what was promised to jobs already submitted.
"""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Any, Final

from shared.errors import InvalidInput

FIELD: Final = "expires_after"
FOREVER: Final = 0  # a retention of 0 seconds, as parsed: `never`, kept for ever (stored as NULL on a job)
MIN_RETENTION_S: Final = 3600  # 1 h: a shorter one would remove outputs before most clients fetch them
MAX_RETENTION_S: Final = 3650 * 86400  # 10 years (of 365 days)
UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
NEVER_WORDS: Final = frozenset({"never", "forever", "for ever"})
_DURATION: Final = re.compile(r"([0-9]+)\s*([smhdwy]?)")
HINT: Final = "write a duration such as 1h, 7d or 30d (from 1h to 3650d), or never (kept for ever)"
MAX_DIGITS: Final = 12  # more is past 3650d in any unit (and int() of 4,301 digits raises ValueError)


class DataState(StrEnum):
    """What the janitor did with a job's objects; stored as its value in `jobs.data_state` (NULL: kept)."""

    removing = "removing"  # marked before any object is deleted: a janitor that dies here is finished by the next
    removed = "removed"  # every object of the job is gone; `data_removed_at` says when
    # Removed on expiry, then its deletion was asked for: only its row is left to delete (it was
    # counted in its batch's `removed_count` when removed, and is not counted again).
    purging = "purging"


def parse_duration(value: Any, *, field: str = FIELD) -> int:
    """Seconds of a retention written `7d`, `12h`, `1y`, a whole number of seconds, or `never` (`FOREVER`).

    `InvalidInput` naming `field`, showing the value, saying what is allowed, for anything
    else or anything outside 1 h .. 10 years.
    """
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise InvalidInput(field, value, HINT)
    text = str(value).strip().lower()
    if text in NEVER_WORDS:
        return FOREVER
    match = _DURATION.fullmatch(text)
    if match is None:
        raise InvalidInput(field, value, HINT)
    digits, unit = match.group(1).lstrip("0") or "0", match.group(2) or "s"
    if len(digits) > MAX_DIGITS:
        raise InvalidInput(field, value, f"is longer than 3650d; {HINT}")
    seconds = int(digits) * UNIT_S[unit]
    if not MIN_RETENTION_S <= seconds <= MAX_RETENTION_S:
        # 0 is shown as written (`0d`), not as `never`: it is no retention at all, not a refusal to expire.
        shown = format_duration(seconds) if seconds else f"0{unit}"
        raise InvalidInput(field, value, f"is {shown}, outside 1h .. 3650d; {HINT}")
    return seconds


def format_duration(seconds: int | None) -> str:
    """A retention as people write it: `7d`, `36h`, `90m`, `45s`; `never` for None or `FOREVER`."""
    if not seconds:
        return "never"
    for unit in ("y", "w", "d", "h", "m"):
        if seconds % UNIT_S[unit] == 0:
            return f"{seconds // UNIT_S[unit]}{unit}"
    return f"{seconds}s"


def resolve_retention(*choices: int | None) -> int | None:
    """The first retention given (None: not given here), as a job stores it: seconds, or None for ever."""
    for choice in choices:
        if choice is not None:
            return None if choice == FOREVER else choice
    return None
