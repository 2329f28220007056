"""What a user of the shared API expects of retention at its edges: a bad `expires_after`, however
written, is a 422 naming the field, showing the value and saying the fix, never a 500."""

from __future__ import annotations

import json

import pytest
from fastapi.testclient import TestClient

from tests.scheduler.api.conftest import upload


@pytest.mark.parametrize("value", ["9" * 5000, "0", 0, 1.5, [], {"days": 7}])
def test_a_bad_expires_after_of_a_job_or_a_batch_row_is_a_422_that_names_it(
    client: TestClient, alice: dict[str, str], value: object
) -> None:
    ref = upload(client, alice)
    row = {"prompt": "p", "references": [ref], "expires_after": value}
    jsonl = {**alice, "Content-Type": "application/jsonl"}

    for answer in (
        client.post("/v1/jobs", headers=alice, json=row),
        client.post("/v1/batches", headers=jsonl, content=json.dumps(row).encode()),
    ):
        assert answer.status_code == 422, answer.text
        detail = answer.json()["detail"]
        assert "expires_after" in detail and "1h, 7d or 30d" in detail and "is never" not in detail
        assert len(detail) < 600  # the value is shown cut short, not echoed whole
