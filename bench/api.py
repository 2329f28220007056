"""The HTTP API's overhead: POST /v1/jobs against a bare endpoint on the same server, and bulk batches.

- jobs: 16 concurrent clients POST /v1/jobs (one job each, a stored reference); p50, p99
  latency and requests/s. floor: the same clients GET /healthz (an endpoint that does
  nothing) on the same `ipab api` process, in the same run. Goal: p50 <= 3x the floor's.
- batch: one POST /v1/batches of N rows vs `submit_manifest` of the same N rows (same
  references, fresh batch each). Goal: within 1.5x.

Both on SQLite and, where one answers at 127.0.0.1:5432, on PostgreSQL; private Redis and S3.
Run: `python -m bench.api [--requests 800] [--rows 10000] [--database sqlite|postgres]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Final

import httpx

from bench.common import (
    Database,
    bench_settings,
    log,
    postgres_available,
    private_database,
    private_services,
    start_api,
    write_manifest,
    write_references,
)
from scheduler.submission.submit import submit_manifest
from scheduler.tenants import create_key
from shared.db import ensure_database, make_engine, make_session_factory
from shared.jobs import transaction
from shared.settings import Settings

CLIENTS: Final = 16
WARM_UP: Final = 3  # uncounted calls per client before the measured ones
SMALL: Final = {"steps": 2, "width": 64, "height": 64}


def _key(settings: Settings) -> str:
    ensure_database(settings.database_url)
    engine = make_engine(settings.database_url)
    with transaction(make_session_factory(engine)) as session:
        key = create_key(session=session, tenant="bench").key
    engine.dispose()
    return key


def _load(url: str, key: str, requests: int, call: Callable[[httpx.Client, int], httpx.Response]) -> dict[str, float]:
    """`requests` calls spread over CLIENTS threads, each with its own connection; latency stats.

    Each client first makes WARM_UP calls that are not counted (its connection, the server's
    first statements and caches), then its share of `requests`.
    """
    per_client = requests // CLIENTS

    def client_run(c: int) -> list[float]:
        latencies = []
        with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=60) as client:
            for i in range(WARM_UP):
                call(client, requests + c * WARM_UP + i)
            for i in range(per_client):
                t0 = time.perf_counter()
                response = call(client, c * per_client + i)
                latencies.append(time.perf_counter() - t0)
                assert response.status_code < 300, response.text
        return latencies

    t0 = time.perf_counter()
    with ThreadPoolExecutor(CLIENTS) as pool:
        all_latencies = sorted(x for lat in pool.map(client_run, range(CLIENTS)) for x in lat)
    wall_s = time.perf_counter() - t0
    return {
        "p50_ms": 1000 * statistics.median(all_latencies),
        "p99_ms": 1000 * all_latencies[int(0.99 * (len(all_latencies) - 1))],
        "rps": len(all_latencies) / wall_s,
    }


def _jobs(url: str, key: str, ref: str, requests: int) -> dict[str, Any]:
    def post(client: httpx.Client, i: int) -> httpx.Response:
        return client.post("/v1/jobs", json={"references": [ref], "prompt": f"p{i}", "seed": i, **SMALL})

    floor = _load(url, key, requests, lambda client, _: client.get("/healthz"))
    jobs = _load(url, key, requests, post)
    return {"floor": floor, "post_jobs": jobs, "p50_ratio": jobs["p50_ms"] / floor["p50_ms"]}


def _batch(url: str, key: str, settings: Settings, workdir: Path, rows: int) -> dict[str, float]:
    refs = write_references(workdir / "refs", 10)
    manifest = write_manifest(workdir / "rows.jsonl", refs, rows=rows, fields=SMALL)
    client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=600)
    ids = {}
    for path in refs:
        ids[str(path)] = client.post("/v1/references", files={"file": (path.name, path.read_bytes())}).json()["id"]
    lines = []
    for line in manifest.read_text().splitlines():
        row = json.loads(line)
        row["references"] = [ids[row.pop("reference")]]
        lines.append(json.dumps(row))
    body = "\n".join(lines).encode()
    t0 = time.perf_counter()
    response = client.post("/v1/batches", content=body, headers={"content-type": "application/jsonl"})
    api_s = time.perf_counter() - t0
    assert response.status_code == 202 and response.json()["added"] == rows, response.text[:500]
    t0 = time.perf_counter()
    result = submit_manifest(settings=settings, path=manifest, batch_name="bench-cli")
    cli_s = time.perf_counter() - t0
    assert result.added == rows
    return {"rows": rows, "api_s": api_s, "submit_manifest_s": cli_s, "ratio": api_s / cli_s}


def _measure(svc: Any, database_url: str, *, requests: int, rows: int) -> dict[str, Any]:
    """Both measurements against one `ipab api` process on `database_url`."""
    workdir = Path(tempfile.mkdtemp(dir=svc.workdir))
    model_set = workdir / "model-set.toml"
    model_set.write_text('name = "bench"\nbase = "b"\nip_adapter = "a.safetensors"\nimage_encoder = "e"\n')
    # One tenant's 16 clients at full speed: no queued-jobs cap, no request or body rate limit (overhead measured).
    settings = bench_settings(
        svc,
        database_url,
        model_set=model_set,
        api_max_queued_jobs=10_000_000,
        api_rate_per_s=0,
        api_body_bytes_per_s=0,
    )
    key = _key(settings)
    proc, url = start_api(settings, workdir / "api.log")
    try:
        client = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"})
        png = write_references(workdir / "one", 1)[0].read_bytes()
        ref = client.post("/v1/references", files={"file": ("a.png", png)}).json()["id"]
        return {"jobs": _jobs(url, key, ref, requests), "batch": _batch(url, key, settings, workdir, rows)}
    finally:
        proc.terminate()
        proc.wait()


def run(*, requests: int = 800, rows: int = 10_000, databases: list[Database] | None = None) -> dict[str, Any]:
    """Both measurements on each database (SQLite, and PostgreSQL where it answers), private Redis and S3."""
    kinds: list[Database] = databases or (["sqlite", "postgres"] if postgres_available() else ["sqlite"])
    figures: dict[str, Any] = {"clients": CLIENTS, "requests": requests, "databases": {}}
    with private_services() as svc:
        for kind in kinds:
            with private_database(kind, svc.workdir) as url:
                figures["databases"][kind] = _measure(svc, url, requests=requests, rows=rows)
    return figures


def worst(figures: dict[str, Any], part: str) -> float:
    """The highest ratio of `part` (jobs: p50 over the floor's; batch: over `submit_manifest`) across databases."""
    key = "p50_ratio" if part == "jobs" else "ratio"
    return max(float(db[part][key]) for db in figures["databases"].values())


def to_markdown(figures: dict[str, Any]) -> str:
    """The section for BENCHMARKS.md."""
    names = {"sqlite": "SQLite", "postgres": "PostgreSQL"}
    lines = [
        f"One `ipab api` process (uvicorn) per database, {figures['clients']} concurrent clients, "
        f"{figures['requests']} requests each way; the floor is `GET /healthz` on the same server, same run.",
        "",
        "| database | | p50 ms | p99 ms | requests/s | p50 / floor |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for kind, db in figures["databases"].items():
        floor, post = db["jobs"]["floor"], db["jobs"]["post_jobs"]
        lines.append(
            f"| {names[kind]} | floor: GET /healthz | {floor['p50_ms']:.1f} | {floor['p99_ms']:.1f} "
            f"| {floor['rps']:.0f} | |"
        )
        lines.append(
            f"| {names[kind]} | POST /v1/jobs | {post['p50_ms']:.1f} | {post['p99_ms']:.1f} | {post['rps']:.0f} "
            f"| **{db['jobs']['p50_ratio']:.2f}x** |"
        )
    lines += [
        "",
        "| database | rows | POST /v1/batches s | `submit_manifest` s | ratio |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for kind, db in figures["databases"].items():
        b = db["batch"]
        lines.append(
            f"| {names[kind]} | {b['rows']:,} | {b['api_s']:.2f} | {b['submit_manifest_s']:.2f} "
            f"| **{b['ratio']:.2f}x** |"
        )
    lines += [
        "",
        f"Goals: POST /v1/jobs p50 <= 3x the floor's (worst database: {worst(figures, 'jobs'):.2f}x); "
        f"a batch within 1.5x of `submit_manifest` (worst: {worst(figures, 'batch'):.2f}x). Concurrent "
        "POST /v1/jobs requests are written in groups (`scheduler/api/job_groups.py`).",
    ]
    return "\n".join(lines)


def main() -> None:
    """Run both measurements and print them as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=800)
    parser.add_argument("--rows", type=int, default=10_000)
    parser.add_argument("--database", choices=["sqlite", "postgres"], action="append")
    args = parser.parse_args()
    report = run(requests=args.requests, rows=args.rows, databases=args.database)
    log(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(to_markdown(report))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
