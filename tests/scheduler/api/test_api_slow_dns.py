"""A webhook host whose DNS never answers costs its tenant a 422, and nobody else anything.

The scenario (`slow_dns_scenario.py`) runs a real `ipab api` in a loopback-only network
namespace whose only DNS server never answers; see it for what is sent and timed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

from devkit.netns import GLIBC_ATTEMPTS, GLIBC_TIMEOUT_S
from tests.scheduler.api.slow_dns_scenario import BATCHES, DNS_TIMEOUT_S, JOBS

pytestmark = pytest.mark.slow
# Bounds over what the same probe took on the quiet server just before (`*_quiet_max_s`): a
# shared two-core machine adds its own noise to every request, flood or not.
HEALTHZ_BOUND_S = 0.5
OTHER_TENANT_BOUND_S = 1.0
# Beyond the DNS timeout, what a slow request may take with 65 at once; still far below the
# C library's own give-up time, GLIBC_TIMEOUT_S * GLIBC_ATTEMPTS.
ANSWER_MARGIN_S = 2.0


@pytest.fixture(scope="module")
def flood(run_isolated: Callable[..., dict[str, Any]]) -> dict[str, object]:
    """The scenario's figures (it runs once for the module's tests)."""
    result = run_isolated("tests.scheduler.api.slow_dns_scenario", timeout_s=420)
    print(json.dumps({k: v for k, v in result.items() if k != "slow"}, indent=1))
    return result


def test_healthz_answers_at_once_while_webhook_hosts_hang_in_dns(flood: dict[str, object]) -> None:
    assert flood["healthz_count"] >= 3, flood  # type: ignore[operator]
    assert flood["healthz_max_s"] < HEALTHZ_BOUND_S + flood["healthz_quiet_max_s"], flood  # type: ignore[operator]


def test_another_tenant_lists_and_submits_with_a_webhook_at_once_meanwhile(flood: dict[str, object]) -> None:
    assert flood["other_list_statuses"] == [200], flood
    assert flood["other_job_statuses"] == [202], flood
    for probe in ("other_list", "other_job"):
        assert flood[f"{probe}_max_s"] < OTHER_TENANT_BOUND_S + flood[f"{probe}_quiet_max_s"], flood  # type: ignore[operator]


def test_each_hanging_webhook_url_is_refused_with_422_within_the_dns_timeout(flood: dict[str, object]) -> None:
    slow: list[dict[str, object]] = flood["slow"]  # type: ignore[assignment]
    assert len(slow) == BATCHES + JOBS
    for answer in slow:
        assert answer["status"] == 422, answer
        assert answer["fields"] == ["webhook.url"], answer
        assert f"did not resolve in {DNS_TIMEOUT_S:g} s" in str(answer["detail"]), answer
    slowest = max(float(a["elapsed_s"]) for a in slow)  # type: ignore[arg-type]
    assert slowest < DNS_TIMEOUT_S + ANSWER_MARGIN_S < GLIBC_TIMEOUT_S * GLIBC_ATTEMPTS, slowest
