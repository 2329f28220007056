"""A plan gives its batches a retention through its `[set]` table, checked as every row's `expires_after` is."""

from __future__ import annotations

import pytest

from scheduler.plans.planfile import check_set
from shared.errors import InvalidInput


def test_a_plans_set_table_takes_a_retention_and_refuses_a_bad_one() -> None:
    assert check_set({"expires_after": "30d", "steps": 20})["expires_after"] == "30d"
    with pytest.raises(InvalidInput) as refused:
        check_set({"expires_after": "a month"})
    assert "expires_after" in str(refused.value) and "a month" in str(refused.value)
