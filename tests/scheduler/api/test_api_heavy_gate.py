"""One large-body request in flight per tenant (a real `ipab api`): a second one of the same tenant
waits for the slot, its body unread, and is refused with 429 `busy` after WAIT_S; another
tenant's is served meanwhile."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Final

import httpx

from scheduler.api.heavy_gate import WAIT_S
from shared.settings import Settings
from tests.scheduler.api.conftest import JOB, make_key, png_bytes
from tests.scheduler.api.served import ServedApi

JSONL: Final = {"content-type": "application/jsonl"}


def headers_of(settings: Settings, tenant: str) -> dict[str, str]:
    key, _ = make_key(settings, tenant)
    return {"Authorization": f"Bearer {key}"}


def upload(url: str, headers: dict[str, str]) -> str:
    r = httpx.post(url + "/v1/references", headers=headers, files={"file": ("a.png", png_bytes(), "image/png")})
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


class SlowBatch:
    """A POST /v1/batches whose body stops after its first row until `finish()`: the request stays in flight."""

    def __init__(self, url: str, headers: dict[str, str], rows: list[str]) -> None:
        self.sent_first, self.go_on = threading.Event(), threading.Event()
        self.answer: httpx.Response | None = None
        self.rows = rows
        self.thread = threading.Thread(target=self._post, args=(url, headers))
        self.thread.start()
        assert self.sent_first.wait(30)

    def _body(self) -> Iterator[bytes]:
        yield (self.rows[0] + "\n").encode()
        self.sent_first.set()
        self.go_on.wait(60)
        yield "\n".join(self.rows[1:]).encode()

    def _post(self, url: str, headers: dict[str, str]) -> None:
        self.answer = httpx.post(url + "/v1/batches", headers={**headers, **JSONL}, content=self._body(), timeout=60)

    def finish(self) -> httpx.Response:
        self.go_on.set()
        self.thread.join(60)
        assert self.answer is not None
        return self.answer


def head_only(url: str, path: str, headers: dict[str, str], content_length: int) -> tuple[int, str, float]:
    """Send a POST's head announcing `content_length` bytes, and none of them; (status, answer, seconds)."""
    host, port = url.removeprefix("http://").split(":")
    fields = {"Host": host, "Content-Length": str(content_length), **JSONL, **headers}
    head = "".join(f"{k}: {v}\r\n" for k, v in fields.items())
    t0 = time.perf_counter()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\n{head}\r\n".encode())
        answer = b""
        while not _whole(answer) and (chunk := s.recv(65536)):
            answer += chunk
    text = answer.decode()
    return int(text.split()[1]), text, time.perf_counter() - t0


def _whole(answer: bytes) -> bool:
    head, sep, body = answer.partition(b"\r\n\r\n")
    lengths = [line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")]
    return bool(sep) and bool(lengths) and len(body) >= int(lengths[0])


def test_a_second_large_body_request_of_a_tenant_gets_429_busy_before_its_body_is_read(
    api_settings: Settings, serve: Callable[..., ServedApi]
) -> None:
    alice, bob = headers_of(api_settings, "alice"), headers_of(api_settings, "bob")
    api = serve()
    refs = {"alice": upload(api.url, alice), "bob": upload(api.url, bob)}

    def rows(tenant: str, n: int) -> list[str]:
        return [json.dumps({**JOB, "references": [refs[tenant]], "prompt": f"{tenant} {i}"}) for i in range(n)]

    first = SlowBatch(api.url, alice, rows("alice", 3))
    # Alice's second batch: refused after WAIT_S, though its 10 MB body was never sent.
    status, answer, seconds = head_only(api.url, "/v1/batches", alice, 10_000_000)
    assert status == 429, answer
    assert "retry-after: 1" in answer.lower() and "application/problem+json" in answer
    assert "/busy" in answer and "(POST /v1/batches)" in answer and "one at a time per tenant" in answer
    assert WAIT_S <= seconds < WAIT_S + 5
    # An upload is a large-body request too; a small request is not.
    r = httpx.post(api.url + "/v1/references", headers=alice, files={"file": ("b.png", png_bytes((1, 2, 3)))})
    assert r.status_code == 429 and r.json()["type"].endswith("/busy"), r.text
    assert httpx.get(api.url + "/v1/batches", headers=alice).status_code == 200
    # Another tenant's batch goes in meanwhile.
    r = httpx.post(api.url + "/v1/batches", headers={**bob, **JSONL}, content="\n".join(rows("bob", 2)))
    assert r.status_code == 202, r.text
    # The first batch is whole; once it is answered, the slot is free again.
    first_answer = first.finish()
    assert first_answer.status_code == 202 and first_answer.json()["added"] == 3, first_answer.text
    r = httpx.post(api.url + "/v1/batches", headers={**alice, **JSONL}, content="\n".join(rows("alice", 2)))
    assert r.status_code == 202, r.text


def test_a_refused_large_body_request_frees_the_slot(api_settings: Settings, serve: Callable[..., ServedApi]) -> None:
    alice = headers_of(api_settings, "alice")
    api = serve()
    r = httpx.post(api.url + "/v1/batches", headers={**alice, **JSONL}, content=b'{"prompt": 1}\n')
    assert r.status_code == 422, r.text
    r = httpx.post(api.url + "/v1/references", headers=alice, files={"file": ("a.png", png_bytes())})
    assert r.status_code == 201, r.text
