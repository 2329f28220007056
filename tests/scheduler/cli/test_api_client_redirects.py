"""The `--api` client never hands its key to a redirect target (issue 21, item 8)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from scheduler.cli.api_client import ApiError, Client

KEY = "ipab_secret_key_never_forwarded"


class _Recorder(BaseHTTPRequestHandler):
    """Answers 200 with `{}` and records the headers of every request."""

    seen: list[dict[str, str]]

    def do_GET(self) -> None:
        self.seen.append(dict(self.headers.items()))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, *args: Any) -> None:
        """Quiet."""


def _redirector(target: str, status: int) -> type[BaseHTTPRequestHandler]:
    class Redirect(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status)
            self.send_header("Location", target + self.path)
            self.end_headers()

        do_POST = do_GET

        def log_message(self, *args: Any) -> None:
            """Quiet."""

    return Redirect


def _serve(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[dict[str, str]]]]:
    """(URL of a server on its own port that records the headers it gets, those headers)."""
    seen: list[dict[str, str]] = []
    handler = type("Recorder", (_Recorder,), {"seen": seen})
    for url in _serve(handler):
        yield url, seen


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
def test_a_redirect_is_refused_and_the_key_never_reaches_its_target(
    recorder: tuple[str, list[dict[str, str]]], status: int
) -> None:
    target, seen = recorder
    for api in _serve(_redirector(target, status)):
        with pytest.raises(ApiError) as caught:
            Client(api, KEY).json("GET", "/v1/batches/b1")
        message = str(caught.value)
        assert f"a redirect to {target}/v1/batches/b1" in message and f"--api {target})" in message
        assert KEY not in message
    assert not any(KEY in value for headers in seen for value in headers.values())
    assert seen == []  # refused before the target is asked at all


def test_the_client_still_reaches_an_api_that_does_not_redirect(recorder: tuple[str, list[dict[str, str]]]) -> None:
    target, seen = recorder
    assert Client(target, KEY).json("GET", "/v1/batches/b1") == {}
    assert seen[0]["Authorization"] == f"Bearer {KEY}"
