"""Per-tenant budget of large bodies in bytes (a second token bucket per tenant in a real Redis): a tenant
past it gets 429 before its body is read, another tenant's bodies are served, a streamed body is paid for
once read, and the settings refuse a burst that could never carry the largest body."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, Final

import httpx
import pytest
from fastapi.testclient import TestClient

from scheduler.api.app import create_app
from shared.errors import SettingsError
from shared.settings import Settings, load_settings
from tests.scheduler.api.conftest import JOB, assert_problem, upload
from tests.scheduler.api.served import ServedApi

JSONL: Final = {"content-type": "application/jsonl"}
KIB: Final = 1024
# Slow enough that no refill lands inside one test: 1 KiB/s.
BUDGET: Final = {"api_body_bytes_per_s": 1024.0, "api_body_burst_bytes": 200 * KIB, "api_max_body_bytes": 100 * KIB}


def rows_of(ref: str, size_bytes: int) -> bytes:
    """JSONL rows of `ref`, about `size_bytes` long (padded prompts), every row valid."""
    rows, body, i = [], 0, 0
    while body < size_bytes - 600:
        line = json.dumps({**JOB, "references": [ref], "prompt": "p" * 400, "seed": i})
        rows.append(line)
        body, i = body + len(line) + 1, i + 1
    return ("\n".join(rows) + "\n").encode()


@pytest.fixture
def budget_client(api_settings: Settings) -> Iterator[TestClient]:
    settings = api_settings.model_copy(update={**BUDGET, "api_batch_processes": 0})
    with TestClient(create_app(settings, dispatcher=False), raise_server_exceptions=False) as c:
        yield c


def test_a_tenant_past_its_body_budget_gets_429_and_another_tenant_is_served(
    budget_client: TestClient, alice: dict[str, str], bob: dict[str, str]
) -> None:
    ref_a, ref_b = upload(budget_client, alice), upload(budget_client, bob)
    body = rows_of(ref_a, 90 * KIB)
    post = lambda headers, data: budget_client.post("/v1/batches", headers={**headers, **JSONL}, content=data)  # noqa: E731
    assert [post(alice, body).status_code for _ in range(2)] == [202, 202]  # 180 KiB of a 200 KiB burst
    refused = post(alice, body)
    assert_problem(refused, 429, "alice", "IPAB_API_BODY_BYTES_PER_S", "IPAB_API_BODY_BURST_BYTES", "not read")
    assert refused.json()["type"].endswith("/rate-limited")
    assert int(refused.headers["retry-after"]) >= 60  # 90 KiB at 1 KiB/s, less the 20 KiB left
    assert refused.headers["connection"] == "close"
    assert post(bob, rows_of(ref_b, 90 * KIB)).status_code == 202  # bob's bytes are his own
    assert budget_client.get("/v1/batches", headers=alice).status_code == 200  # small requests are not held
    small = post(alice, rows_of(ref_a, 5 * KIB))
    assert small.status_code == 202, small.text  # what is left of the burst still pays for a small batch
    up = budget_client.post("/v1/references", headers=alice, files={"file": ("a.png", b"x" * 30 * KIB, "image/png")})
    assert_problem(up, 429, "IPAB_API_BODY_BYTES_PER_S")  # uploads pay from the same bucket


def test_a_streamed_body_is_paid_for_once_read(budget_client: TestClient, alice: dict[str, str]) -> None:
    ref = upload(budget_client, alice)
    body = rows_of(ref, 90 * KIB)
    streamed = budget_client.post(
        "/v1/batches", headers={**alice, **JSONL}, content=iter([body[:40_000], body[40_000:]])
    )  # chunked: no Content-Length to pay from
    assert streamed.status_code == 202, streamed.text
    assert "content-length" not in streamed.request.headers
    again = budget_client.post("/v1/batches", headers={**alice, **JSONL}, content=body)
    assert again.status_code == 202  # 180 KiB paid in all
    assert_problem(budget_client.post("/v1/batches", headers={**alice, **JSONL}, content=body), 429, "not read")


def test_no_body_budget_when_its_rate_is_zero(api_settings: Settings, alice: dict[str, str]) -> None:
    settings = api_settings.model_copy(update={**BUDGET, "api_body_bytes_per_s": 0.0, "api_batch_processes": 0})
    with TestClient(create_app(settings, dispatcher=False), raise_server_exceptions=False) as client:
        body = rows_of(upload(client, alice), 90 * KIB)
        answers = [client.post("/v1/batches", headers={**alice, **JSONL}, content=body) for _ in range(4)]
        assert [r.status_code for r in answers] == [202] * 4


def test_a_refused_body_is_not_read_over_a_real_socket(serve: Callable[..., ServedApi], alice: dict[str, str]) -> None:
    """The 429 comes back while the client is still sending: the server closed the connection
    instead of reading the rest (32 MiB, where the first was paid for)."""
    api = serve(api_body_bytes_per_s=1024.0, api_body_burst_bytes=64 * KIB * KIB, api_max_body_bytes=32 * KIB * KIB)
    body = b'{"prompt": 1}\n' * (32 * KIB * KIB // 14)
    sent = [0]

    def counted() -> Iterator[bytes]:
        for start in range(0, len(body), 256 * KIB):
            sent[0] += len(body[start : start + 256 * KIB])
            yield body[start : start + 256 * KIB]

    headers = {**alice, **JSONL, "content-length": str(len(body))}
    with httpx.Client(base_url=api.url, timeout=60) as http:
        assert http.post("/v1/batches", headers=headers, content=body).status_code == 422  # read: paid 32 MiB
        assert http.post("/v1/batches", headers=headers, content=body).status_code == 422  # the burst's second
    # On a new connection: the server's receive buffer of one that carried 64 MiB had grown (loopback
    # lets Linux take it to 32 MiB), and would hold most of the body unread, counted here as sent.
    with httpx.Client(base_url=api.url, timeout=60) as http:
        refused = http.post("/v1/batches", headers=headers, content=counted())
    assert_problem(refused, 429, "not read")
    assert sent[0] < len(body) // 2, sent[0]  # most of it was never sent: nothing read it


@pytest.mark.parametrize(
    ("env", "words"),
    [
        ({"IPAB_API_BODY_BURST_BYTES": "1000"}, ["IPAB_API_BODY_BURST_BYTES (1000)", "IPAB_API_MAX_BODY_BYTES"]),
        ({"IPAB_API_BODY_BYTES_PER_S": "-5"}, ["api_body_bytes_per_s", "-5"]),
    ],
)
def test_body_budget_settings_are_checked(
    env: dict[str, str], words: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as e:
        load_settings()
    for word in words:
        assert word.lower() in str(e.value).lower(), str(e.value)


def test_the_default_burst_follows_the_largest_body(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IPAB_API_MAX_BODY_BYTES", str(256 * KIB * KIB))
    settings: Any = load_settings()
    assert settings.api_body_burst_bytes == 512 * KIB * KIB
