"""A webhook host whose DNS never answers costs its tenant a 422, and nobody else anything.

The scenario (`slow_dns_scenario.py`) runs a real `ipab api` in a loopback-only network
namespace whose only DNS server never answers; see it for what is sent and timed.
"""

from __future__ import annotations

import json

import pytest

from tests.scheduler.api.slow_dns_scenario import BATCHES, DNS_TIMEOUT_S, JOBS
from tests.scheduler.webhooks.netns import run_isolated

pytestmark = pytest.mark.slow
# Beyond the DNS timeout, what a slow request may take on a loaded two-core machine.
ANSWER_MARGIN_S = 1.5


@pytest.fixture(scope="module")
def flood() -> dict[str, object]:
    """The scenario's figures (it runs once for the module's tests)."""
    result = run_isolated("tests.scheduler.api.slow_dns_scenario", timeout_s=420)
    print(json.dumps({k: v for k, v in result.items() if k != "slow"}, indent=1))
    return result


def test_healthz_answers_at_once_while_webhook_hosts_hang_in_dns(flood: dict[str, object]) -> None:
    assert flood["healthz_count"] >= 3, flood  # type: ignore[operator]
    assert flood["healthz_max_s"] < 0.5, flood  # type: ignore[operator]


def test_another_tenant_lists_and_submits_with_a_webhook_at_once_meanwhile(flood: dict[str, object]) -> None:
    assert flood["other_list_statuses"] == [200], flood
    assert flood["other_job_statuses"] == [202], flood
    assert flood["other_list_max_s"] < 1.0, flood  # type: ignore[operator]
    assert flood["other_job_max_s"] < 1.0, flood  # type: ignore[operator]


def test_each_hanging_webhook_url_is_refused_with_422_within_the_dns_timeout(flood: dict[str, object]) -> None:
    slow: list[dict[str, object]] = flood["slow"]  # type: ignore[assignment]
    assert len(slow) == BATCHES + JOBS
    for answer in slow:
        assert answer["status"] == 422, answer
        assert answer["fields"] == ["webhook.url"], answer
        assert f"did not resolve in {DNS_TIMEOUT_S:g} s" in str(answer["detail"]), answer
    slowest = max(float(a["elapsed_s"]) for a in slow)  # type: ignore[arg-type]
    assert slowest < DNS_TIMEOUT_S + ANSWER_MARGIN_S, slowest
