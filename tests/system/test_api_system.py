"""The API end to end: a real `ipab api` process (uvicorn), real workers, Redis, S3, SQL, webhook receivers."""

from __future__ import annotations

import hashlib
import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from PIL import Image
from sqlalchemy import select

from scheduler.webhooks.signing import verify
from shared.db import Job, make_engine, make_session_factory
from shared.settings import Settings
from tests.scheduler.api.conftest import make_key, png_bytes
from tests.scheduler.api.served import ServedApi
from tests.system.conftest import Workers

pytestmark = pytest.mark.slow


@pytest.fixture
def api_env(
    system_settings: Settings, settings_env: Callable[[Settings], dict[str, str]]
) -> tuple[Settings, dict[str, str]]:
    settings = system_settings.model_copy(
        update={
            "webhook_allow_private": True,
            "webhook_poll_s": 0.2,
            "webhook_retry_base_s": 0.3,
            "webhook_timeout_s": 2.0,
        }
    )
    env = {**os.environ, **settings_env(settings), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return settings, env


@pytest.fixture
def api(api_env: tuple[Settings, dict[str, str]], tmp_path: Path) -> Iterator[ServedApi]:
    server = ServedApi(api_env[1], tmp_path / "api.log")
    server.start()
    yield server
    server.stop()


class Receiver:
    """A local webhook receiver that fails the first `fail_first` deliveries of each message id."""

    def __init__(self, fail_first: int = 0, hang_first: bool = False) -> None:
        self.got: list[tuple[dict[str, str], bytes]] = []
        self.fail_first, self.hang_first = fail_first, hang_first
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["content-length"]))
                headers = {k.lower(): v for k, v in self.headers.items()}
                receiver.got.append((headers, body))
                tries = sum(1 for h, _ in receiver.got if h["webhook-id"] == headers["webhook-id"])
                if receiver.hang_first and tries == 1:
                    time.sleep(30)
                self.send_response(500 if tries <= receiver.fail_first else 204)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, count: int, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while len(self.got) < count and time.monotonic() < deadline:
            time.sleep(0.1)
        assert len(self.got) >= count, self.got


def wait_done(client: httpx.Client, path: str, timeout_s: float = 300) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        found: dict[str, Any] = client.get(path).raise_for_status().json()
        if found["status"] not in ("queued", "running", "in_progress"):
            return found
        time.sleep(0.5)
    pytest.fail(f"{path} did not finish")


def test_upload_submit_poll_and_download_over_http_match_sql(
    api: ServedApi, api_env: tuple[Settings, dict[str, str]], workers: Workers
) -> None:
    settings, _ = api_env
    key, secret = make_key(settings, "acme")
    assert secret is not None
    hooks = Receiver()
    workers.start()
    client = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    ref = client.post("/v1/references", files={"file": ("a.png", png_bytes(), "image/png")}).json()["id"]
    small = {"steps": 2, "width": 64, "height": 64}
    job = client.post(
        "/v1/jobs", json={"references": [ref], "prompt": "one", **small, "webhook": {"url": hooks.url}}
    ).json()
    rows = "\n".join(json.dumps({"references": [ref], "prompt": f"row {i}", "seed": i, **small}) for i in range(20))
    batch = client.post(
        f"/v1/batches?webhook_url={hooks.url}", content=rows, headers={"content-type": "application/jsonl"}
    ).json()
    assert batch["added"] == 20
    assert wait_done(client, f"/v1/jobs/{job['id']}")["status"] == "succeeded"
    assert wait_done(client, f"/v1/batches/{batch['id']}")["counts"]["succeeded"] == 20
    results = [json.loads(line) for line in client.get(f"/v1/batches/{batch['id']}/results").text.splitlines()]
    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session:
        expected = dict(session.execute(select(Job.id, Job.output_sha256)).tuples().all())
    for job_id in [job["id"], *(r["job_id"] for r in results)]:
        view = client.get(f"/v1/jobs/{job_id}").json()
        png = urllib.request.urlopen(view["image_url"], timeout=30).read()
        assert hashlib.sha256(png).hexdigest() == expected[job_id] == view["output_sha256"]
    redirect = client.get(f"/v1/jobs/{job['id']}/image")
    assert redirect.status_code == 307
    # Webhooks: job.succeeded for the job, batch.completed for the batch, each signed.
    hooks.wait(2)
    types = sorted(json.loads(body)["type"] for _, body in hooks.got)
    assert types == ["batch.completed", "job.succeeded"]
    assert all(verify(secret=secret, headers=h, body=b) for h, b in hooks.got)


def test_a_failing_receiver_gets_the_same_message_id_until_it_accepts(
    api: ServedApi, api_env: tuple[Settings, dict[str, str]]
) -> None:
    settings, _ = api_env
    key, secret = make_key(settings, "acme")
    assert secret is not None
    hooks = Receiver(fail_first=2)
    client = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    ref = client.post("/v1/references", files={"file": ("a.png", png_bytes(), "image/png")}).json()["id"]
    job = client.post("/v1/jobs", json={"references": [ref], "prompt": "x", "webhook": {"url": hooks.url}}).json()
    assert client.post(f"/v1/jobs/{job['id']}/cancel").json()["status"] == "canceled"
    hooks.wait(3)
    time.sleep(1.0)
    assert len(hooks.got) == 3
    assert len({h["webhook-id"] for h, _ in hooks.got}) == 1
    assert all(verify(secret=secret, headers=h, body=b) for h, b in hooks.got)
    assert json.loads(hooks.got[0][1])["type"] == "job.canceled"


def test_killing_the_api_mid_delivery_loses_no_event(api: ServedApi, api_env: tuple[Settings, dict[str, str]]) -> None:
    settings, _ = api_env
    key, _ = make_key(settings, "acme")
    hooks = Receiver(hang_first=True)
    client = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    ref = client.post("/v1/references", files={"file": ("a.png", png_bytes(), "image/png")}).json()["id"]
    job = client.post("/v1/jobs", json={"references": [ref], "prompt": "x", "webhook": {"url": hooks.url}}).json()
    client.post(f"/v1/jobs/{job['id']}/cancel")
    hooks.wait(1)  # the first delivery hangs in the receiver ...
    api.stop()  # ... and the API dies under it
    api.start()  # a new process picks the message up once its claim expires
    hooks.wait(2, timeout_s=90)
    assert hooks.got[0][0]["webhook-id"] == hooks.got[1][0]["webhook-id"]


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_submit_status_and_results_go_through_the_api_alone(
    api: ServedApi, api_env: tuple[Settings, dict[str, str]], tmp_path: Path
) -> None:
    settings, _ = api_env
    key, _ = make_key(settings, "cli")
    Image.new("RGB", (48, 48), (30, 160, 90)).save(tmp_path / "ref.png")
    rows = [
        {"reference": "ref.png", "prompt": f"row {i}", "seed": i, "steps": 2, "width": 64, "height": 64}
        for i in range(3)
    ]
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    # Every service setting points at a closed port: touching SQL, Redis or S3 would fail the command.
    dead = f"127.0.0.1:{closed_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPAB_")}
    env.update(
        IPAB_API_KEY=key,
        IPAB_DATABASE_URL=f"postgresql+psycopg://nobody@{dead}/none",
        IPAB_REDIS_URL=f"redis://{dead}/0",
        IPAB_S3_ENDPOINT_URL=f"http://{dead}",
    )

    def ipab(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "ipab.cli", *argv, "--api", api.url],
            env=env,
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    submitted = ipab("submit", "rows.jsonl")
    assert submitted.returncode == 0, submitted.stderr
    batch_id = submitted.stdout.strip().splitlines()[-1]
    status = ipab("status", batch_id)
    assert status.returncode == 0, status.stderr
    assert "queued" in status.stdout and "3" in status.stdout
    results = ipab("results", batch_id)
    assert results.returncode == 0, results.stderr
    lines = [json.loads(line) for line in results.stdout.splitlines() if line.strip()]
    assert sorted(line["seed"] for line in lines) == [0, 1, 2]
    assert {line["status"] for line in lines} == {"queued"}

    # `submit --watch` waits until every job is final (here: canceled over HTTP while it watches).
    watching = subprocess.Popen(
        [sys.executable, "-m", "ipab.cli", "submit", "rows.jsonl", "--watch", "--interval", "0.1", "--api", api.url],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    client = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {key}"}, timeout=30)
    deadline = time.monotonic() + 60
    while len(client.get("/v1/batches").json()) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    second = next(b["id"] for b in client.get("/v1/batches").json() if b["id"] != batch_id)
    time.sleep(0.5)
    assert watching.poll() is None  # still watching: nothing is final yet
    client.post(f"/v1/batches/{second}/cancel").raise_for_status()
    out, err = watching.communicate(timeout=60)
    assert watching.returncode == 0, err
    assert "done: 3 canceled" in out.splitlines() and out.splitlines()[-1] == second
