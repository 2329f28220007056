"""One tenant cannot hurt another through the API: what a big or hostile batch costs the API
process, how `/healthz` answers meanwhile, and another tenant's latency beside a flood.

Each measurement runs on a fresh `ipab api` process (its peak RSS, VmHWM, is the process's own):

- hostile: one POST /v1/batches of `--hostile-mib` MiB of `{"prompt":1}` lines (every line
  invalid): seconds to the answer, the answer's size, the process's peak RSS before and after.
- max batch: one POST /v1/batches of `--rows` valid rows, prompts padded so that the body is
  about `--max-batch-mib` MiB (the most both caps let through): the same figures.
- healthz: during each of those, GET /healthz every 10 ms from a process of its own: p50, max.
- neighbour: tenant `calm` GETs its job, one request at a time, alone and while tenant `flood`
  GETs its gallery from 16 connections of another process, ignoring Retry-After (in turns, 4
  rounds of 50 each): calm's p50 alone and beside, and flood's answers by status; with the
  rate limit at its defaults and turned off (IPAB_API_RATE_PER_S=0); and beside 16 connections
  GETting /v1/batches with a made-up key, with key lookups limited (defaults) and not
  (IPAB_API_KEY_LOOKUPS_PER_S=0).

Run: `python -m bench.tenant_isolation [--hostile-mib 64] [--rows 100000] [--database sqlite|postgres]`;
`--combined` runs only the two-tenant scenario of `bench/two_tenants.py` instead (one hostile
tenant attacking every way at once beside a calm one: p99 latency, webhook delay, peak memory).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

import httpx

from bench.common import (
    Database,
    Services,
    bench_settings,
    log,
    private_database,
    private_services,
    start_api,
    write_references,
)
from devkit.flood import Flood, Probe
from scheduler.tenants import create_key
from shared.db import ensure_database, make_engine, make_session_factory
from shared.jobs import transaction
from shared.settings import Settings

MIB: Final = 1024 * 1024
FLOOD_CLIENTS: Final = 16
CALM_REQUESTS: Final = 50  # per round
ROUNDS: Final = 4  # alone, then beside the flood, in turns
FLOOD_BATCH_ROWS: Final = 20
HEALTHZ_EVERY_S: Final = 0.01
SMALL: Final = {"steps": 2, "width": 64, "height": 64}
JSONL: Final = {"content-type": "application/jsonl"}


def status_kib(pid: int, field: str) -> int:
    """A field of /proc/<pid>/status in KiB (VmHWM: the process's peak resident memory)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/{pid}/status")


def tenant_keys(settings: Settings, *tenants: str) -> dict[str, dict[str, str]]:
    """A new key for each tenant (the database made if need be): their Authorization headers."""
    ensure_database(settings.database_url)
    engine = make_engine(settings.database_url)
    try:
        with transaction(make_session_factory(engine)) as session:
            keys = {t: create_key(session=session, tenant=t).key for t in tenants}
    finally:
        engine.dispose()
    return {t: {"Authorization": f"Bearer {k}"} for t, k in keys.items()}


@contextmanager
def api_process(settings: Settings, workdir: Path, name: str) -> Iterator[tuple[int, str]]:
    """A fresh `ipab api` process on `settings`, its log `<name>.log` in `workdir`: (pid, base URL)."""
    proc, url = start_api(settings, workdir / f"{name}.log", OMP_NUM_THREADS="1")
    try:
        yield proc.pid, url
    finally:
        proc.terminate()
        proc.wait()


def _post_batch(pid: int, url: str, headers: dict[str, str], body: bytes) -> dict[str, Any]:
    """POST `body` to /v1/batches while /healthz is polled; time, answer, healthz, peak RSS."""
    peak_before = status_kib(pid, "VmHWM") * 1024
    probe = Probe(url, "/healthz", HEALTHZ_EVERY_S).start()
    try:
        t0 = time.perf_counter()
        response = httpx.post(url + "/v1/batches", content=body, headers={**headers, **JSONL}, timeout=1800)
        seconds = time.perf_counter() - t0
    finally:
        healthz = probe.stop()
    return {
        "body_mib": len(body) / MIB,
        "status": response.status_code,
        "seconds": seconds,
        "answer_bytes": len(response.content),
        "answer_start": response.text[:300],
        "peak_rss_before_mib": peak_before / MIB,
        "peak_rss_after_mib": status_kib(pid, "VmHWM") * 1024 / MIB,
        "healthz_p50_ms": 1000 * statistics.median(healthz) if healthz else None,
        "healthz_max_ms": 1000 * max(healthz) if healthz else None,
        "healthz_polls": len(healthz),
    }


def upload(url: str, headers: dict[str, str], png: bytes) -> str:
    """POST a reference image; its id."""
    response = httpx.post(url + "/v1/references", headers=headers, files={"file": ("a.png", png)}, timeout=60)
    assert response.status_code == 201, response.text
    return str(response.json()["id"])


def _valid_body(ref: str, rows: int, target_bytes: int) -> bytes:
    """`rows` valid rows whose prompts are padded so that the body is about `target_bytes`."""
    bare = len(json.dumps({"references": [ref], "prompt": "", "seed": 0, **SMALL})) + 12
    pad = "x" * max(0, min(1900, target_bytes // rows - bare))
    lines = (json.dumps({"references": [ref], "prompt": f"{pad} {i}", "seed": i, **SMALL}) for i in range(rows))
    return ("\n".join(lines) + "\n").encode()


def _batches(settings: Settings, workdir: Path, png: bytes, *, hostile_mib: int, rows: int, max_mib: int) -> Any:
    figures: dict[str, Any] = {}
    hostile = b'{"prompt":1}\n' * (hostile_mib * MIB // 13)
    headers = tenant_keys(settings, "hostile")["hostile"]
    with api_process(settings, workdir, "api-hostile") as (pid, url):
        figures["hostile"] = _post_batch(pid, url, headers, hostile)
    log(f"hostile: {json.dumps(figures['hostile'])}")
    del hostile
    with api_process(settings, workdir, "api-max") as (pid, url):
        body = _valid_body(upload(url, headers, png), rows, max_mib * MIB)
        figures["max_batch"] = {"rows": rows, **_post_batch(pid, url, headers, body)}
    log(f"max batch: {json.dumps(figures['max_batch'])}")
    return figures


def _calm_latencies(url: str, headers: dict[str, str], job_id: str, statuses: Counter[int]) -> list[float]:
    latencies = []
    with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
        for _ in range(CALM_REQUESTS):
            t0 = time.perf_counter()
            statuses[client.get(f"/v1/jobs/{job_id}").status_code] += 1
            latencies.append(time.perf_counter() - t0)
    return latencies


def _neighbour(
    settings: Settings, workdir: Path, png: bytes, name: str, *, made_up_key: bool = False
) -> dict[str, Any]:
    """Calm's latency alone and beside the flood, measured in turns (ROUNDS of each); `made_up_key`:
    the flood GETs /v1/batches with a key nobody holds (each a lookup in SQL, unless refused)."""
    keys = tenant_keys(settings, "calm", "flood")
    with api_process(settings, workdir, f"api-{name}") as (_pid, url):
        calm_ref, flood_ref = upload(url, keys["calm"], png), upload(url, keys["flood"], png)
        job = httpx.post(url + "/v1/jobs", headers=keys["calm"], json={"references": [calm_ref], "prompt": "p"})
        rows = "\n".join(
            json.dumps({"references": [flood_ref], "prompt": f"p{i}", **SMALL}) for i in range(FLOOD_BATCH_ROWS)
        )
        batch = httpx.post(url + "/v1/batches", headers={**keys["flood"], **JSONL}, content=rows, timeout=60)
        assert job.status_code == 202 and batch.status_code == 202, (job.text, batch.text)
        alone: list[float] = []
        beside: list[float] = []
        calm_statuses: Counter[int] = Counter()
        if made_up_key:
            flood = Flood(url, {"Authorization": "Bearer ipab_" + "0" * 43}, "/v1/batches", FLOOD_CLIENTS).start()
        else:
            flood = Flood(url, keys["flood"], f"/v1/batches/{batch.json()['id']}/gallery", FLOOD_CLIENTS).start()
        try:
            for _ in range(ROUNDS):
                alone += _calm_latencies(url, keys["calm"], job.json()["id"], calm_statuses)
                flood.resume()
                beside += _calm_latencies(url, keys["calm"], job.json()["id"], calm_statuses)
                flood.pause()
        finally:
            flood_statuses = flood.stop()
    return {
        "calm_alone_p50_ms": 1000 * statistics.median(alone),
        "calm_beside_flood_p50_ms": 1000 * statistics.median(beside),
        "calm_statuses": dict(calm_statuses),
        "flood_statuses": flood_statuses,
    }


def _measure(svc: Services, kind: Database, args: argparse.Namespace) -> dict[str, Any]:
    """Each measurement on a fresh database of `kind`: the neighbours' not beside the maximal
    batch's 100,000 queued jobs (a GET of a queued job reads the backlog ahead of it)."""
    workdir = Path(tempfile.mkdtemp(dir=svc.workdir))
    model_set = workdir / "model-set.toml"
    model_set.write_text('name = "bench"\nbase = "b"\nip_adapter = "a.safetensors"\nimage_encoder = "e"\n')
    png = write_references(workdir / "one", 1)[0].read_bytes()
    figures: dict[str, Any] = {}
    if not args.skip_batches:
        with private_database(kind, svc.workdir) as url:
            settings = bench_settings(svc, url, model_set=model_set, api_rate_per_s=0)
            sizes = {"hostile_mib": args.hostile_mib, "rows": args.rows, "max_mib": args.max_batch_mib}
            figures.update(_batches(settings, workdir, png, **sizes))
    scenarios: list[tuple[str, dict[str, Any], bool]] = [
        ("rate_limited", {}, False),
        ("unlimited", {"api_rate_per_s": 0}, False),
        ("made_up_keys_limited", {}, True),
        ("made_up_keys_unlimited", {"api_key_lookups_per_s": 0}, True),
    ]
    for name, overrides, made_up_key in scenarios:
        with private_database(kind, svc.workdir) as url:
            settings = bench_settings(svc, url, model_set=model_set, **overrides)
            figures[f"neighbour_{name}"] = _neighbour(settings, workdir, png, name, made_up_key=made_up_key)
        log(f"neighbour {name}: {json.dumps(figures[f'neighbour_{name}'])}")
    return figures


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement on each database asked for, private Redis and S3."""
    figures: dict[str, Any] = {"databases": {}}
    with private_services() as svc:
        for kind in args.database or ["sqlite"]:
            figures["databases"][kind] = _measure(svc, kind, args)
    return figures


def main() -> None:
    """Run the measurements and print them as JSON."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--hostile-mib", type=int, default=64)
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--max-batch-mib", type=int, default=60)
    parser.add_argument("--skip-batches", action="store_true", help="only the neighbour measurement")
    parser.add_argument("--database", choices=["sqlite", "postgres"], action="append")
    parser.add_argument("--combined", action="store_true", help="only the two-tenant scenario (bench/two_tenants.py)")
    args = parser.parse_args()
    if args.combined:
        from bench import two_tenants  # imports this module's helpers

        figures = two_tenants.run(two_tenants.Options())
        print(json.dumps(figures, indent=2))
        print(two_tenants.to_markdown(figures))
        return
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
