"""The start-order policy: lanes by weight, tenants fairly within a lane, nobody starves, idle shares go to others."""

from __future__ import annotations

import itertools
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import pytest

from shared.dispatch.policy import DEFAULT_LANE_WEIGHTS, Policy
from shared.dispatch.position import starts_before

BIG = 10**6


def shares(starts: list[tuple[str, str]], level: int) -> dict[str, float]:
    counted = Counter(start[level] for start in starts)
    return {name: n / len(starts) for name, n in counted.items()}


def test_backlogged_lanes_start_in_proportion_to_their_weights() -> None:
    counts = {("interactive", "a"): BIG, ("scheduled", "a"): BIG, ("bulk", "a"): BIG}
    got = shares(Policy().order(counts, 1000), level=0)
    for lane, weight in DEFAULT_LANE_WEIGHTS.items():
        assert got[lane] == pytest.approx(weight / 100, abs=0.02)


def test_an_idle_lanes_share_goes_to_the_others() -> None:
    got = shares(Policy().order({("bulk", "a"): BIG, ("scheduled", "a"): BIG}, 1000), level=0)
    assert got["scheduled"] == pytest.approx(20 / 30, abs=0.02)
    assert got["bulk"] == pytest.approx(10 / 30, abs=0.02)
    assert Policy().order({("bulk", "a"): 5}, 1000) == [("bulk", "a")] * 5


def test_a_lane_back_from_idle_gets_its_share_not_a_burst_of_saved_credit() -> None:
    policy = Policy()
    policy.order({("bulk", "a"): BIG}, 500)  # interactive was idle meanwhile
    got = shares(policy.order({("bulk", "a"): BIG, ("interactive", "b"): BIG}, 800), level=0)
    assert got["interactive"] == pytest.approx(70 / 80, abs=0.02)


def test_an_interactive_job_behind_a_bulk_backlog_starts_next() -> None:
    policy = Policy()
    policy.order({("bulk", "a"): BIG}, 10_000)
    assert policy.order({("bulk", "a"): BIG, ("interactive", "b"): 1}, 1) == [("interactive", "b")]


def test_tenants_in_one_lane_share_equally_by_default_and_by_weight_when_set() -> None:
    counts = {("bulk", "a"): BIG, ("bulk", "b"): BIG}
    assert shares(Policy().order(counts, 1000), level=1) == {"a": 0.5, "b": 0.5}
    weighted = Policy(tenant_weights={"a": 3, "b": 1})
    assert shares(weighted.order(counts, 1000), level=1) == {"a": 0.75, "b": 0.25}


def test_a_small_tenant_is_not_starved_by_a_big_one() -> None:
    starts = Policy().order({("bulk", "big"): 20_000, ("bulk", "small"): 200}, 400)
    assert shares(starts, level=1)["small"] == pytest.approx(0.5, abs=0.05)
    assert sum(1 for s in starts if s[1] == "small") == 200


def test_no_backlogged_lane_waits_longer_than_its_stride() -> None:
    starts = Policy().order({("interactive", "a"): BIG, ("scheduled", "a"): BIG, ("bulk", "a"): BIG}, 1000)
    bulk_at = [i for i, (lane, _) in enumerate(starts) if lane == "bulk"]
    gaps = [b - a for a, b in itertools.pairwise(bulk_at)]
    assert max(gaps) <= 11  # weight 10 of 100: one start in every ten, give or take a tie


def test_the_order_is_deterministic() -> None:
    counts = {("interactive", "x"): 7, ("bulk", "y"): 50, ("bulk", "z"): 50, ("scheduled", "x"): 9}
    assert Policy().order(counts, 100) == Policy().order(counts, 100)


@dataclass
class CountingPolicy(Policy):
    """A Policy that counts the starts it simulates."""

    simulated: int = 0

    def next_start(self, backlog: Callable[[], Mapping[str, Iterable[str]]]) -> tuple[str, str] | None:
        self.simulated += 1
        return super().next_start(backlog)


def test_a_queue_position_simulates_the_starts_up_to_its_job_not_another_tenants_whole_backlog() -> None:
    counts = {("bulk", "hostile"): 99_000, ("interactive", "calm"): 1, ("bulk", "calm"): 3}
    policy = CountingPolicy()
    assert starts_before(policy=policy, counts=counts, key=("interactive", "calm"), ahead_in_key=0) == 0
    assert policy.simulated == 1  # the whole order was 50,000 starts: 0.45 s of the API's CPU per GET
    assert Policy().order(counts, 20) == list(Policy().starts(counts, 20))
