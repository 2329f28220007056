"""When the slots of a plan fall: cron expressions read in the wall-clock time of a time zone.

Slots are computed in the plan's time zone and stored as naive UTC. A cron expression is
iterated over naive wall-clock times (plain calendar arithmetic, nothing for DST to break),
and each wall time is then placed on the time line by these rules:

- a wall time that exists once is that instant;
- a wall time that does not exist (spring forward: 02:30 in Europe/Berlin on the last
  Sunday of March) runs at the first instant after the gap (03:00 CEST), once;
- a wall time that occurs twice (fall back: 02:30 on the last Sunday of October) runs at
  its first occurrence (02:30 CEST), once.

Why not croniter's own time-zone support: croniter 7 given an aware start moves a
nonexistent time to the end of the gap too (02:30 -> 03:00 CEST), but yields a repeated
wall time twice (02:30 CEST and 02:30 CET), so a nightly plan would run twice on the
fall-back night; and its handling of DST has changed between releases. Iterating wall
times and placing them ourselves gives the same answer on every croniter release.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Final
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

from shared.errors import InvalidInput

# Wider than any DST shift (2 h at most, Antarctica/Troll): where iteration starts before
# the first wall time that can map after a given instant.
DST_MARGIN: Final = timedelta(hours=3)
MAX_GAP_MINUTES: Final = 180
MAX_TIMEZONE_CHARS: Final = 64
CRON_FIELDS: Final = 5
CRON_HINT: Final = "write 5 fields (minute hour day-of-month month day-of-week), e.g. '30 2 * * *', or @daily"


def check_schedule(value: object) -> str:
    """A cron expression of 5 fields (or an @alias such as @daily); `InvalidInput` naming `schedule`."""
    if not isinstance(value, str) or not value.strip():
        raise InvalidInput("schedule", value, CRON_HINT)
    expression = " ".join(value.split())
    if not expression.startswith("@") and len(expression.split()) != CRON_FIELDS:
        raise InvalidInput("schedule", value, f"has {len(expression.split())} fields; {CRON_HINT}")
    try:
        croniter(expression, datetime(2000, 1, 1)).get_next(datetime)  # an impossible date fails here
    except (ValueError, KeyError) as e:  # croniter's errors are ValueErrors; a bad alias a KeyError
        raise InvalidInput("schedule", value, f"is not a cron expression ({e}); {CRON_HINT}") from None
    return expression


def check_timezone(value: object) -> ZoneInfo:
    """The IANA time zone named `value` (e.g. Europe/Berlin); `InvalidInput` naming `timezone`."""
    hint = "must be an IANA time zone name such as UTC, Europe/Berlin or America/New_York"
    if not isinstance(value, str) or not value or len(value) > MAX_TIMEZONE_CHARS:
        raise InvalidInput("timezone", value, hint)
    try:
        return ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise InvalidInput("timezone", value, f"is not a known time zone; {hint}") from None


def _exists(wall: datetime, zone: ZoneInfo) -> bool:
    there_and_back = wall.replace(tzinfo=zone).astimezone(UTC).astimezone(zone)
    return there_and_back.replace(tzinfo=None) == wall


def wall_to_utc(wall: datetime, zone: ZoneInfo) -> datetime:
    """The naive UTC instant of a naive wall time in `zone`, by the rules in the module docstring."""
    moved = wall
    for _ in range(MAX_GAP_MINUTES):
        if _exists(moved, zone):
            break
        moved = moved.replace(second=0, microsecond=0) + timedelta(minutes=1)  # to the end of the gap
    # fold=0 (the default) is the first of two occurrences.
    return moved.replace(tzinfo=zone).astimezone(UTC).replace(tzinfo=None)


def utc_to_wall(instant: datetime, zone: ZoneInfo) -> datetime:
    """The naive wall time in `zone` of a naive UTC instant."""
    return instant.replace(tzinfo=UTC).astimezone(zone).replace(tzinfo=None)


def local_iso(instant: datetime, zone: ZoneInfo) -> str:
    """A naive UTC instant as ISO 8601 in `zone`, with its offset: `2026-03-29T03:00:00+02:00`."""
    return instant.replace(tzinfo=UTC).astimezone(zone).isoformat()


def _walls(schedule: str, start_wall: datetime, *, forward: bool) -> Iterator[datetime]:
    cron = croniter(schedule, start_wall)
    while True:
        yield cron.get_next(datetime) if forward else cron.get_prev(datetime)


def slots_after(schedule: str, zone: ZoneInfo, after: datetime, until: datetime, *, limit: int) -> list[datetime]:
    """The slots in (after, until], oldest first, at most `limit` of them; naive UTC.

    Wall times map to instants in order (never backwards), so equal instants (the wall
    times inside a spring-forward gap) are adjacent and kept once.
    """
    found: list[datetime] = []
    for wall in _walls(schedule, utc_to_wall(after, zone) - DST_MARGIN, forward=True):
        instant = wall_to_utc(wall, zone)
        if instant > until or len(found) >= limit:
            break
        if instant > after and (not found or instant != found[-1]):
            found.append(instant)
    return found


def next_slot(schedule: str, zone: ZoneInfo, after: datetime) -> datetime:
    """The first slot after `after` (naive UTC)."""
    for wall in _walls(schedule, utc_to_wall(after, zone) - DST_MARGIN, forward=True):
        instant = wall_to_utc(wall, zone)
        if instant > after:
            return instant
    raise AssertionError("unreachable: the iteration is endless")


def latest_slot(schedule: str, zone: ZoneInfo, until: datetime) -> datetime:
    """The last slot at or before `until` (naive UTC)."""
    start = utc_to_wall(until, zone) + DST_MARGIN + timedelta(minutes=1)
    for wall in _walls(schedule, start.replace(second=0, microsecond=0), forward=False):
        instant = wall_to_utc(wall, zone)
        if instant <= until:
            return instant
    raise AssertionError("unreachable: the iteration is endless")
