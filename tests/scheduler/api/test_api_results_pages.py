"""`GET /v1/batches/{id}/results` streams a batch's lines a page of jobs at a time, each page read
in a transaction of its own: every job once, in manifest order, and a client that stops reading
holds no SQL transaction (one held for the whole stream let slow readers take the API's pool)."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable
from typing import Final

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient

from scheduler.api.app import create_app
from scheduler.api.routes.batches import RESULTS_PAGE
from shared.settings import Settings
from tests.scheduler.api.conftest import JOB, make_key, png_bytes, upload
from tests.scheduler.api.served import ServedApi

JSONL: Final = {"content-type": "application/jsonl"}


def _rows(ref: str, count: int) -> str:
    return "\n".join(json.dumps({**JOB, "references": [ref], "seed": i, "id": f"row-{i}"}) for i in range(count))


@pytest.mark.parametrize("database_url", ["sqlite", "postgres"], indirect=True)
def test_every_job_comes_once_in_manifest_order_across_pages(api_settings: Settings, database_url: str) -> None:
    settings = api_settings.model_copy(update={"database_url": database_url, "api_rate_per_s": 0})
    key, _ = make_key(settings, "alice")
    alice = {"Authorization": f"Bearer {key}"}
    count = 2 * RESULTS_PAGE + 7
    with TestClient(create_app(settings, dispatcher=False), raise_server_exceptions=False) as client:
        batch = client.post("/v1/batches", headers={**alice, **JSONL}, content=_rows(upload(client, alice), count))
        assert batch.status_code == 202, batch.text
        answer = client.get(f"/v1/batches/{batch.json()['id']}/results", headers=alice)
        queued = client.get(f"/v1/batches/{batch.json()['id']}/results?status=queued", headers=alice)

    lines = [json.loads(line) for line in answer.text.splitlines()]
    assert [line["id"] for line in lines] == [f"row-{i}" for i in range(count)]
    assert len({line["job_id"] for line in lines}) == count
    assert queued.text == answer.text  # all queued: the filter pages the same way


def _open_transactions(url: str) -> int:
    """Backends of the database's other connections that sit in an open transaction."""
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND pid <> pg_backend_pid() AND state LIKE 'idle in transaction%'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _no_transaction_for_a_while(url: str, *, samples: int = 4, every_s: float = 0.5, within_s: float = 30.0) -> bool:
    """Whether `samples` looks in a row, `every_s` apart, find no open transaction (the server
    blocked on a full socket: a page being read meanwhile is one briefly) before `within_s`."""
    deadline = time.monotonic() + within_s
    quiet = 0
    while quiet < samples and time.monotonic() < deadline:
        quiet = quiet + 1 if _open_transactions(url) == 0 else 0
        time.sleep(every_s)
    return quiet == samples


def test_a_client_that_stops_reading_holds_no_transaction(
    api_settings: Settings, postgres_url: str, serve: Callable[..., ServedApi]
) -> None:
    settings = api_settings.model_copy(update={"database_url": postgres_url, "api_rate_per_s": 0})
    key, _ = make_key(settings, "alice")
    alice = {"Authorization": f"Bearer {key}"}
    server = serve(database_url=postgres_url, api_rate_per_s=0, api_batch_processes=0)
    # A small receive window (set before connecting, so the kernel does not grow it): the server's
    # writes block once its send buffer (up to 4 MB here) is full, as with a client reading slowly.
    small_window = httpx.HTTPTransport(socket_options=[(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)])
    with httpx.Client(base_url=server.url, headers=alice, timeout=60, transport=small_window) as client:
        png = {"file": ("r.png", png_bytes(), "image/png")}
        ref = client.post("/v1/references", files=png).json()["id"]
        batch = client.post("/v1/batches", headers=JSONL, content=_rows(ref, 20 * RESULTS_PAGE))  # about 20 MB of lines
        assert batch.status_code == 202, batch.text
        with client.stream("GET", f"/v1/batches/{batch.json()['id']}/results") as stream:
            chunks = stream.iter_bytes()  # kept: a dropped iterator closes the stream
            assert next(chunks).startswith(b'{"job_id"')  # then nothing read: the server's writes block
            assert _no_transaction_for_a_while(postgres_url)
            assert sum(len(chunk) for chunk in chunks) > 10_000_000  # the rest comes once read
