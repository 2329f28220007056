"""The start-order policy: weighted shares between lanes, fair shares between tenants, FIFO within.

Stride scheduling (Waldspurger and Weihl, 1995) at both levels: every candidate (a lane, or a
tenant within a lane) carries a virtual time ("pass") that advances by 1/weight each time it
starts a job; the candidate with work and the smallest pass goes next. Over any window each
backlogged candidate gets starts in proportion to its weight; a candidate without work is
skipped, so its share goes to the others (work-conserving); and one that comes back from idle
resumes at the current virtual time instead of spending credit saved while it was idle, so
nobody starves and nobody bursts. Ties go to the heavier weight, then by name, so the order
is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Final, Literal, get_args

# The lanes, defined here once: the API's parameter types, the CLI's choices and every check derive from it.
Lane = Literal["interactive", "scheduled", "bulk"]
LANES: Final[tuple[Lane, ...]] = get_args(Lane)
DEFAULT_LANE_WEIGHTS: Final = {"interactive": 70, "scheduled": 20, "bulk": 10}
DEFAULT_TENANT_WEIGHT: Final = 1
DEFAULT_LANE: Final[Lane] = "bulk"  # manifests, grids and API batches; single API jobs are `interactive`
INTERACTIVE_LANE: Final[Lane] = "interactive"


@dataclass
class Stride:
    """Weighted fair picking among named candidates by stride scheduling."""

    weights: Mapping[str, float] = field(default_factory=dict)
    default_weight: float = DEFAULT_TENANT_WEIGHT
    _pass: dict[str, float] = field(default_factory=dict)
    _now: float = 0.0

    def weight(self, name: str) -> float:
        """The candidate's weight (the default for names not configured)."""
        return float(self.weights.get(name, self.default_weight))

    def pick(self, candidates: Iterable[str]) -> str | None:
        """The candidate with work that goes next (None when there is none); charges it one start."""
        ready = sorted(candidates)
        if not ready:
            return None
        for name in ready:
            # Back from idle (or new): start at the current virtual time, not with saved-up credit.
            self._pass[name] = max(self._pass.get(name, self._now), self._now)
        chosen = min(ready, key=lambda name: (self._pass[name], -self.weight(name), name))
        self._now = self._pass[chosen]
        self._pass[chosen] += 1.0 / self.weight(chosen)
        return chosen


@dataclass
class Policy:
    """Two-level stride: lanes by weight, then tenants within the chosen lane."""

    lane_weights: Mapping[str, float] = field(default_factory=lambda: dict(DEFAULT_LANE_WEIGHTS))
    tenant_weights: Mapping[str, float] = field(default_factory=dict)
    _lanes: Stride = field(init=False)
    _tenants: dict[str, Stride] = field(init=False, default_factory=dict)

    def __post_init__(self) -> None:
        self._lanes = Stride(weights=self.lane_weights, default_weight=1)

    def next_start(self, backlog: Callable[[], Mapping[str, Iterable[str]]]) -> tuple[str, str] | None:
        """(lane, tenant) of the next job to start, given `backlog()`: lane -> tenants with queued work."""
        waiting = {lane: list(tenants) for lane, tenants in backlog().items()}
        lane = self._lanes.pick(name for name, tenants in waiting.items() if tenants)
        if lane is None:
            return None
        stride = self._tenants.setdefault(lane, Stride(weights=self.tenant_weights))
        tenant = stride.pick(waiting[lane])
        assert tenant is not None  # the lane was picked because it has tenants with work
        return lane, tenant

    def order(
        self, counts: Mapping[tuple[str, str], int], limit: int, *, caps: Mapping[str, int] | None = None
    ) -> list[tuple[str, str]]:
        """The (lane, tenant) of the next `limit` starts for queued `counts` per (lane, tenant), in order.

        `caps`: how many more starts a held tenant may have (its concurrency cap, `shared.dispatch.holds`);
        a tenant at its cap is skipped as if it had no work, in every lane, and the others proceed.
        Used to plan a dispatch round; consumes the counts and caps it is given only in its own
        copies, but advances this policy's virtual times.
        """
        return list(self.starts(counts, limit, caps=caps))

    def starts(
        self, counts: Mapping[tuple[str, str], int], limit: int, *, caps: Mapping[str, int] | None = None
    ) -> Iterator[tuple[str, str]]:
        """`order`, one start at a time, as it is asked for: a queue position stops at its job's start
        (the whole order of a 99,000-job backlog of another tenant took 0.45 s of the API's CPU, and
        its GIL, for every GET of a job queued beside it)."""
        room = dict(caps or {})
        left = {key: n for key, n in counts.items() if n > 0 and room.get(key[1], 1) > 0}
        for _ in range(limit):
            nxt = self.next_start(lambda: _by_lane(left)) if left else None
            if nxt is None:
                return
            yield nxt
            left[nxt] -= 1
            if not left[nxt]:
                del left[nxt]
            tenant = nxt[1]
            if tenant in room:
                room[tenant] -= 1
                if room[tenant] <= 0:  # at its cap: none of its lanes starts another
                    for key in [key for key in left if key[1] == tenant]:
                        del left[key]


def _by_lane(counts: Mapping[tuple[str, str], int]) -> dict[str, list[str]]:
    lanes: dict[str, list[str]] = {}
    for lane, tenant in counts:
        lanes.setdefault(lane, []).append(tenant)
    return lanes
