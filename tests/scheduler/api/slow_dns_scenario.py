"""A real `ipab api` while one tenant floods it with webhook URLs whose DNS never answers.

Run by `test_api_slow_dns.py` inside a loopback-only namespace (the `run_isolated` fixture):
Redis, SeaweedFS, SQLite and the API all run in there. Tenant `slow` sends BATCHES batch
submissions and JOBS job submissions naming a silent host; meanwhile `/healthz`, tenant
`other`'s batch list and its job with a webhook on `localhost` (answered by /etc/hosts) are
timed, each by its own loop, until every slow request has its answer; and, for comparison,
for QUIET_S before the flood, on the same loaded machine. It stays a module, not a fixture: the
namespace's own Python process imports it and runs its `main`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from devkit import services
from devkit.netns import REPO, SILENT_NAME
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.conftest import TEST_AWS_ENV, settings_env
from tests.scheduler.api.conftest import make_key, png_bytes

BATCHES = 20
JOBS = 45
DNS_TIMEOUT_S = 1.0
QUIET_S = 1.5  # the probes alone, before the flood
SILENT_URL = f"http://{SILENT_NAME}/hook"


def _settings(workdir: Path, redis_url: str, s3_url: str) -> Settings:
    model_set = workdir / "model-set.toml"
    model_set.write_text('name = "tiny"\nbase = "b"\nip_adapter = "a.safetensors"\nimage_encoder = "e"\n')
    store = ObjectStore(endpoint_url=s3_url, bucket="ipab-netns", region="us-east-1")
    store.ensure_bucket()
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=f"sqlite:///{workdir / 'ipab.db'}",
        redis_url=redis_url,
        s3_endpoint_url=s3_url,
        s3_bucket=store.bucket,
        model_set=model_set,
        webhook_allow_private=True,  # `localhost` is the other tenant's host
        api_rate_per_s=0.0,  # what is timed is the look-ups, not the rate limit (65 requests at once cost 170 tokens)
        # Its bodies are small (handled in the API process): no batch processes, whose start-up (two
        # processes importing the API at once) took the cores while the flood was timed (healthz 2 s in CI).
        api_batch_processes=0,
    )


def _env(settings: Settings) -> dict[str, str]:
    env = {**os.environ, **settings_env(settings), "PYTHONUNBUFFERED": "1"}
    env["IPAB_WEBHOOK_DNS_TIMEOUT_S"] = str(DNS_TIMEOUT_S)
    return env


def _start_api(settings: Settings, workdir: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = services.free_port()
    log = (workdir / "api.log").open("ab")
    cmd = [sys.executable, "-m", "ipab.cli", "api", "--port", str(port)]
    proc = subprocess.Popen(cmd, env=_env(settings), cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url + "/healthz", timeout=1).status_code == 200:
                return proc, url
        time.sleep(0.2)
    raise SystemExit(f"ipab api did not start: {(workdir / 'api.log').read_text()[-3000:]}")


async def _timed(call: Any) -> dict[str, Any]:
    start = time.monotonic()
    response: httpx.Response = await call
    body = response.json() if response.headers.get("content-type", "").endswith("json") else {}
    errors = body.get("errors", []) if isinstance(body, dict) else []
    return {
        "status": response.status_code,
        "elapsed_s": time.monotonic() - start,
        "fields": [e.get("field") for e in errors],
        "detail": body.get("detail", "") if isinstance(body, dict) else "",
    }


def _slow_requests(client: httpx.AsyncClient, slow: dict[str, str]) -> list[asyncio.Task[dict[str, Any]]]:
    row = b'{"references": ["ref_none"], "prompt": "x"}\n'
    batch_headers = {**slow, "content-type": "application/jsonl"}
    job = {"references": ["ref_none"], "prompt": "x", "webhook": {"url": SILENT_URL}}
    batches = [
        client.post(f"/v1/batches?webhook_url={SILENT_URL}", content=row, headers=batch_headers) for _ in range(BATCHES)
    ]
    jobs = [client.post("/v1/jobs", json=job, headers=slow) for _ in range(JOBS)]
    return [asyncio.create_task(_timed(call)) for call in [*batches, *jobs]]


async def _probe(client: httpx.AsyncClient, send: Any, until: Callable[[], bool]) -> list[dict[str, Any]]:
    """Time `send(client)` again and again, one at a time, until `until()`."""
    times = []
    while not until():
        times.append(await _timed(send(client)))
        await asyncio.sleep(0.1)
    return times


async def _probe_all(client: httpx.AsyncClient, probes: dict[str, Any], until: Callable[[], bool]) -> dict[str, Any]:
    timed = await asyncio.gather(*(_probe(client, send, until) for send in probes.values()))
    return dict(zip(probes, timed, strict=True))


async def _flood(url: str, slow: dict[str, str], other: dict[str, str], ref: str) -> dict[str, Any]:
    job = {"references": [ref], "prompt": "x", "steps": 2, "webhook": {"url": "http://localhost:9/hook"}}
    probes = {
        "healthz": lambda c: c.get("/healthz"),
        "other_list": lambda c: c.get("/v1/batches", headers=other),
        "other_job": lambda c: c.post("/v1/jobs", json=job, headers=other),
    }
    limits = httpx.Limits(max_connections=500, max_keepalive_connections=500)
    async with httpx.AsyncClient(base_url=url, timeout=180, limits=limits) as client:
        # Each key once before the flood: what is timed is the webhook check, not a cold key cache.
        for headers in (slow, other):
            (await client.get("/v1/batches", headers=headers)).raise_for_status()
        # The same probes on the quiet server first: this machine's own noise, measured alike.
        quiet_end = time.monotonic() + QUIET_S
        quiet = await _probe_all(client, probes, lambda: time.monotonic() > quiet_end)
        started = time.monotonic()
        pending = _slow_requests(client, slow)
        await asyncio.sleep(0.3)  # the slow requests are in the server before the first probe
        flood = await _probe_all(client, probes, lambda: all(task.done() for task in pending))
        slow_answers = [task.result() for task in pending]
        return {"quiet": quiet, "probes": flood, "slow": slow_answers, "flood_s": time.monotonic() - started}


def _summary(raw: dict[str, Any]) -> dict[str, Any]:
    slow_times = [a["elapsed_s"] for a in raw["slow"]]
    out: dict[str, Any] = {"flood_s": raw["flood_s"], "slow": raw["slow"]}
    out |= {"slow_min_s": min(slow_times), "slow_max_s": max(slow_times)}
    for probe, answers in raw["probes"].items():
        times = [a["elapsed_s"] for a in answers] or [0.0]
        quiet = [a["elapsed_s"] for a in raw["quiet"][probe]] or [0.0]
        out[f"{probe}_count"] = len(answers)
        out[f"{probe}_max_s"] = max(times)
        out[f"{probe}_median_s"] = statistics.median(times)
        out[f"{probe}_quiet_max_s"] = max(quiet)
        out[f"{probe}_statuses"] = sorted({a["status"] for a in answers + raw["quiet"][probe]})
    return out


def main(_args: list[str]) -> dict[str, Any]:
    """Start the services and the API in this namespace, flood it, and time the probes."""
    os.environ.update(TEST_AWS_ENV)
    workdir = Path(tempfile.mkdtemp(prefix="ipab-slow-dns-"))
    redis = services.start_redis(workdir=workdir / "redis")
    s3 = services.start_seaweedfs(workdir=workdir / "s3")
    api = None
    try:
        settings = _settings(workdir, redis.url, s3.url)
        slow_key, _ = make_key(settings, "slow")
        other_key, _ = make_key(settings, "other")
        api, url = _start_api(settings, workdir)
        slow, other = ({"Authorization": f"Bearer {k}"} for k in (slow_key, other_key))
        upload = httpx.post(url + "/v1/references", headers=other, files={"file": ("a.png", png_bytes(), "image/png")})
        ref = upload.raise_for_status().json()["id"]
        result = _summary(asyncio.run(_flood(url, slow, other, ref)))
        result["dns_timeout_s"] = DNS_TIMEOUT_S
        return result
    finally:
        if api is not None:
            api.send_signal(signal.SIGKILL)
            api.wait()
        s3.stop()
        redis.stop()
