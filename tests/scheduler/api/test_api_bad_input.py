"""The bad-input corpus: every kind of bad request gets a 4xx problem+json that names the problem."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fastapi.testclient import TestClient

from tests.scheduler.api.conftest import png_bytes

REF = "REF"  # replaced by a real reference id of the tenant
GOOD = {"references": [REF], "prompt": "a cat", "steps": 2, "width": 64, "height": 64}
JSON = {"content-type": "application/json"}
JSONL = {"content-type": "application/jsonl"}


def job(**changes: Any) -> bytes:
    return json.dumps({**GOOD, **changes}).encode()


# (name, method, path, extra headers, body, expected status, words the problem must contain)
CASES: list[tuple[str, str, str, dict[str, str], bytes, int, tuple[str, ...]]] = [
    ("wrong content type", "POST", "/v1/jobs", {"content-type": "text/plain"}, job(), 415, ("content-type",)),
    ("no content type", "POST", "/v1/jobs", {}, job(), 415, ("content-type",)),
    ("empty body", "POST", "/v1/jobs", JSON, b"", 400, ("json",)),
    ("truncated json", "POST", "/v1/jobs", JSON, job()[:-5], 400, ("json",)),
    ("json array", "POST", "/v1/jobs", JSON, b"[1, 2]", 400, ("list",)),
    ("json string", "POST", "/v1/jobs", JSON, b'"hi"', 400, ("str",)),
    ("deep nesting", "POST", "/v1/jobs", JSON, b"[" * 100_000 + b"]" * 100_000, 400, ("nested",)),
    ("non-utf8", "POST", "/v1/jobs", JSON, b'{"prompt": "\xff\xfe"}', 400, ("utf",)),
    ("huge json", "POST", "/v1/jobs", JSON, job(prompt="x" * 400_000), 413, ("larger",)),
    ("unknown field", "POST", "/v1/jobs", JSON, job(colour="red"), 422, ("colour", "unknown")),
    ("server path reference", "POST", "/v1/jobs", JSON, job(reference="/etc/passwd"), 422, ("reference",)),
    ("missing prompt", "POST", "/v1/jobs", JSON, json.dumps({"references": [REF]}).encode(), 422, ("prompt",)),
    ("missing references", "POST", "/v1/jobs", JSON, json.dumps({"prompt": "x"}).encode(), 422, ("references",)),
    ("references not a list", "POST", "/v1/jobs", JSON, job(references="abc"), 422, ("references",)),
    ("bad reference id", "POST", "/v1/jobs", JSON, job(references=["../../x"]), 422, ("references", "id")),
    ("unknown reference id", "POST", "/v1/jobs", JSON, job(references=["a" * 64]), 422, ("no reference",)),
    ("too many references", "POST", "/v1/jobs", JSON, job(references=[REF] * 9), 422, ("references",)),
    ("width not multiple of 8", "POST", "/v1/jobs", JSON, job(width=1001), 422, ("width", "1001")),
    ("negative steps", "POST", "/v1/jobs", JSON, job(steps=-1), 422, ("steps",)),
    ("string seed", "POST", "/v1/jobs", JSON, job(seed="seven"), 422, ("seed",)),
    ("huge seed", "POST", "/v1/jobs", JSON, job(seed=2**70), 422, ("seed",)),
    (
        "nan guidance",
        "POST",
        "/v1/jobs",
        JSON,
        job().replace(b'"steps": 2', b'"steps": 2, "guidance_scale": NaN'),
        422,
        ("guidance",),
    ),
    ("bad scheduler", "POST", "/v1/jobs", JSON, job(scheduler="warp"), 422, ("scheduler",)),
    (
        "bad adapter scale",
        "POST",
        "/v1/jobs",
        JSON,
        job(ip_adapter_scale={"down": {"nope": 1}}),
        422,
        ("ip_adapter_scale",),
    ),
    ("control chars in prompt", "POST", "/v1/jobs", JSON, job(prompt="a\x00b"), 422, ("prompt",)),
    ("id not a string", "POST", "/v1/jobs", JSON, job(id=[1]), 422, ("id",)),
    ("webhook not an object", "POST", "/v1/jobs", JSON, job(webhook="http://x"), 422, ("webhook",)),
    ("webhook bad scheme", "POST", "/v1/jobs", JSON, job(webhook={"url": "file:///etc/passwd"}), 422, ("webhook.url",)),
    (
        "webhook bad event",
        "POST",
        "/v1/jobs",
        JSON,
        job(webhook={"url": "http://127.0.0.1:9/", "events": ["x"]}),
        422,
        ("webhook.events",),
    ),
    ("bad idempotency key", "POST", "/v1/jobs", {**JSON, "Idempotency-Key": "a b"}, job(), 400, ("idempotency-key",)),
    ("batch wrong content type", "POST", "/v1/batches", JSON, job(), 415, ("jsonl",)),
    ("batch empty", "POST", "/v1/batches", JSONL, b"", 422, ("no rows",)),
    ("batch bad line", "POST", "/v1/batches", JSONL, job() + b"\n{oops\n", 422, ("line 2", "json")),
    ("batch non-utf8 line", "POST", "/v1/batches", JSONL, job() + b"\n\xff\n", 422, ("line 2", "utf-8")),
    (
        "batch duplicate ids",
        "POST",
        "/v1/batches",
        JSONL,
        job(id="a") + b"\n" + job(id="a"),
        422,
        ("line 2", "duplicate"),
    ),
    ("batch bad skip_invalid", "POST", "/v1/batches?skip_invalid=maybe", JSONL, job(), 422, ("skip_invalid",)),
    ("results bad status", "GET", "/v1/batches/x/results?status=weird", {}, b"", 422, ("status", "weird")),
    ("list bad limit", "GET", "/v1/batches?limit=0", {}, b"", 422, ("limit",)),
    ("unknown job id", "GET", "/v1/jobs/nope", {}, b"", 404, ("job", "nope")),
    ("unknown batch id", "GET", "/v1/batches/nope", {}, b"", 404, ("batch", "nope")),
    ("unknown route", "GET", "/v1/nothing", {}, b"", 404, ("not found",)),
    ("wrong method", "DELETE", "/v1/jobs", {}, b"", 405, ("method",)),
    ("reference not multipart", "POST", "/v1/references", JSON, b"{}", 415, ("multipart",)),
    (
        "truncated multipart",
        "POST",
        "/v1/references",
        {"content-type": "multipart/form-data; boundary=XX"},
        b'--XX\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n\x89PNG',
        422,
        ("file", "missing"),
    ),
    (
        "multipart without boundary",
        "POST",
        "/v1/references",
        {"content-type": "multipart/form-data"},
        b"--XX\r\n",
        400,
        ("multipart",),
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_gets_a_4xx_problem_naming_it(
    case: tuple[str, str, str, dict[str, str], bytes, int, tuple[str, ...]],
    client: TestClient,
    alice: dict[str, str],
) -> None:
    _, method, path, headers, body, status, words = case
    ref = client.post("/v1/references", headers=alice, files={"file": ("a.png", png_bytes(), "image/png")}).json()["id"]
    r = client.request(method, path, headers={**alice, **headers}, content=body.replace(REF.encode(), ref.encode()))
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    problem = r.json()
    assert problem["status"] == status and problem["detail"]
    for word in words:
        assert word.lower() in r.text.lower(), (word, problem)


@pytest.mark.parametrize(
    ("name", "data", "words"),
    [
        ("not an image", b"hello world", ("file",)),
        ("empty file", b"", ("file",)),
        ("truncated png", png_bytes()[:40], ("file",)),
    ],
)
def test_a_bad_reference_upload_is_refused_naming_the_file(
    name: str, data: bytes, words: tuple[str, ...], client: TestClient, alice: dict[str, str]
) -> None:
    r = client.post("/v1/references", headers=alice, files={"file": ("x.png", data, "image/png")})
    assert 400 <= r.status_code < 500, r.text
    for word in words:
        assert word in r.text


def test_a_reference_larger_than_the_limit_is_413(client: TestClient, alice: dict[str, str]) -> None:
    from shared.images import MAX_REFERENCE_BYTES

    r = client.post(
        "/v1/references", headers=alice, files={"file": ("x.png", b"\0" * (MAX_REFERENCE_BYTES + 10), "image/png")}
    )
    assert r.status_code == 413, r.text
