"""Two tenants, one hostile: what tenant `hostile`, attacking the API every way at once, does
to tenant `calm`'s latency and webhooks, and to the API's memory (issue 21's load test).

One `ipab api` process (SQLite, private Redis and SeaweedFS, no worker), three phases of
`--phase-s` seconds each: calm alone, calm beside hostile, calm alone again (hostile stopped;
its dead-endpoint deliveries may still be pending: the drift check, not the baseline).

- calm, one request at a time from each of two loops: GET its queued job every GET_EVERY_S
  (p50, p99); and submit a job with a webhook to its receiver (devkit.webhook_endpoints, on
  127.0.0.1), cancel it, and time from the cancel's answer to the receiver getting its
  `job.canceled` (the API's delivery loop sends it; no worker runs): median, max.
- hostile (devkit.hostile, devkit.flood), from processes of their own, ignoring Retry-After:
  8192x8192 palette and 1-bit PNGs to POST /v1/references from a few threads; batches of
  `--invalid-mib` MiB of invalid lines; a batch at both caps (`--max-rows` rows, about
  `--max-mib` MiB) with a webhook to a dead endpoint, canceled once accepted; jobs and small
  batches with webhooks to the dead endpoint (a listener that never answers), canceled so that
  their events are due there; jobs and batches with webhooks on a host whose DNS never
  answers; its gallery from FLOOD_CLIENTS connections.
- the API's peak RSS (VmHWM) before and after the hostile phase.

The slow-DNS attack needs a network namespace with loopback only (devkit.netns): `run` starts
the whole scenario in one, so no packet leaves loopback. Where namespaces are refused, it runs
here without that attack, and says so.

Run: `python -m bench.two_tenants [--phase-s 20] [--max-rows 100000]` (or
`python -m bench.tenant_isolation --combined`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import statistics
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import httpx

from bench.common import bench_settings, log, private_database, private_services, write_references
from bench.tenant_isolation import api_process, status_kib, tenant_keys, upload
from devkit.flood import Flood
from devkit.hostile import Hostile, HostilePlan
from devkit.netns import SILENT_NAME, NamespaceRefused, run_isolated
from devkit.webhook_endpoints import DeadEndpoint, Receiver

MIB: Final = 1024 * 1024
GET_EVERY_S: Final = 0.05  # calm's GETs: 20 a second, well inside its own rate limit
WEBHOOK_WAIT_S: Final = 60.0  # a calm event later than this counts as missing
FLOOD_CLIENTS: Final = 16
FLOOD_BATCH_ROWS: Final = 20
GOAL_RATIO: Final = 2.0
WARM_UP_S: Final = 3.0  # calm's loops before the timed phases
SMALL: Final = {"steps": 2, "width": 64, "height": 64}
PHASES: Final = ("alone", "beside", "alone_after")


@dataclass
class _Calm:
    """What calm measured in one phase."""

    get_s: list[float] = field(default_factory=list)
    get_statuses: Counter[int] = field(default_factory=Counter)
    delays_s: list[float] = field(default_factory=list)
    webhook_statuses: Counter[str] = field(default_factory=Counter)

    def figures(self) -> dict[str, Any]:
        delays = self.delays_s
        return {
            "gets": len(self.get_s),
            "get_p50_ms": 1000 * statistics.median(self.get_s),
            "get_p99_ms": 1000 * _p99(self.get_s),
            "get_max_ms": 1000 * max(self.get_s),
            "get_statuses": dict(self.get_statuses),
            "webhooks": len(delays),
            "webhook_delay_median_s": statistics.median(delays) if delays else None,
            "webhook_delay_max_s": max(delays) if delays else None,
            "webhook_statuses": dict(self.webhook_statuses),
        }


def cpu_s(pid: int) -> float:
    """CPU seconds (user and system) that process `pid` has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _p99(values: list[float]) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[98] if len(values) > 1 else values[0]


def _get_loop(http: httpx.Client, job_id: str, until: float, calm: _Calm) -> None:
    while time.monotonic() < until:
        t0 = time.perf_counter()
        calm.get_statuses[http.get(f"/v1/jobs/{job_id}").status_code] += 1
        calm.get_s.append(time.perf_counter() - t0)
        time.sleep(max(0.0, GET_EVERY_S - (time.perf_counter() - t0)))


def _webhook_loop(http: httpx.Client, job: dict[str, Any], receiver: Receiver, until: float, calm: _Calm) -> None:
    while time.monotonic() < until:
        created = http.post("/v1/jobs", json=job)
        if created.status_code != 202:
            calm.webhook_statuses[f"submit {created.status_code}"] += 1
            time.sleep(0.2)
            continue
        job_id = created.json()["id"]
        canceled = http.post(f"/v1/jobs/{job_id}/cancel")
        answered = time.monotonic()
        calm.webhook_statuses[f"cancel {canceled.status_code}"] += 1
        arrival = receiver.wait_for(job_id, "job.canceled", timeout_s=WEBHOOK_WAIT_S)
        if arrival is None:
            calm.webhook_statuses["missing"] += 1
            continue
        calm.delays_s.append(max(0.0, arrival.at_s - answered))


def _calm_phase(
    url: str, headers: dict[str, str], job_id: str, job: dict[str, Any], receiver: Receiver, s: float
) -> Any:
    """Calm's two loops for `s` seconds; their figures."""
    calm, until = _Calm(), time.monotonic() + s
    with (
        httpx.Client(base_url=url, headers=headers, timeout=120) as gets,
        httpx.Client(base_url=url, headers=headers, timeout=120) as hooks,
    ):
        loops = [
            threading.Thread(target=_get_loop, args=(gets, job_id, until, calm)),
            threading.Thread(target=_webhook_loop, args=(hooks, job, receiver, until, calm)),
        ]
        for loop in loops:
            loop.start()
        for loop in loops:
            loop.join()
    return calm.figures()


@dataclass(frozen=True)
class Options:
    """The scenario's sizes."""

    phase_s: float = 30.0  # about 600 GETs a phase: a p99 of a few hundred is the few slowest, and noisy
    invalid_mib: int = 32
    max_rows: int = 99_000  # the queued-jobs cap (100,000) less room for hostile's other jobs
    max_mib: int = 60
    slow_dns: bool = True
    only: tuple[str, ...] = ()  # hostile's attacks to run (devkit.hostile's names, and gallery_flood); () for all


def scenario(options: Options) -> dict[str, Any]:
    """The three phases on one fresh API process; every figure."""
    with private_services() as svc, private_database("sqlite", svc.workdir) as db_url:
        workdir = Path(tempfile.mkdtemp(dir=svc.workdir))
        model_set = workdir / "model-set.toml"
        model_set.write_text('name = "bench"\nbase = "b"\nip_adapter = "a.safetensors"\nimage_encoder = "e"\n')
        png = write_references(workdir / "one", 1)[0].read_bytes()
        settings = bench_settings(svc, db_url, model_set=model_set, webhook_allow_private=True)
        keys = tenant_keys(settings, "calm", "hostile")
        receiver, dead = Receiver().start(), DeadEndpoint().start()
        try:
            with api_process(settings, workdir, "api-two-tenants") as (pid, url):
                return _phases(options, pid, url, keys, png, receiver, dead)
        finally:
            receiver.stop()
            dead.stop()


def _phases(
    options: Options, pid: int, url: str, keys: dict[str, dict[str, str]], png: bytes, receiver: Receiver, dead: Any
) -> dict[str, Any]:
    calm_ref, hostile_ref = upload(url, keys["calm"], png), upload(url, keys["hostile"], png)
    calm_job = httpx.post(url + "/v1/jobs", headers=keys["calm"], json={"references": [calm_ref], "prompt": "p"})
    rows = "\n".join(json.dumps({"references": [hostile_ref], "prompt": f"p{i}", **SMALL}) for i in range(20))
    gallery_batch = httpx.post(
        url + "/v1/batches", headers={**keys["hostile"], "content-type": "application/jsonl"}, content=rows
    )
    assert calm_job.status_code == 202 and gallery_batch.status_code == 202, (calm_job.text, gallery_batch.text)
    hook_job = {
        "references": [calm_ref],
        "prompt": "p",
        **SMALL,
        "webhook": {"url": receiver.url, "events": ["job.canceled"]},
    }
    plan = HostilePlan(
        url=url,
        headers=keys["hostile"],
        reference=hostile_ref,
        dead_url=dead.url,
        silent_url=f"http://{SILENT_NAME}/hook" if options.slow_dns else None,
        invalid_batch_mib=options.invalid_mib,
        max_batch_rows=options.max_rows,
        max_batch_mib=options.max_mib,
        only=options.only,
    )
    hostile = Hostile(plan).start()
    gallery = f"/v1/batches/{gallery_batch.json()['id']}/gallery"
    flooding = not options.only or "gallery_flood" in options.only
    flood = Flood(url, keys["hostile"], gallery, FLOOD_CLIENTS if flooding else 0).start()

    def calm() -> Any:
        cpu_before, t0 = cpu_s(pid), time.monotonic()
        figures = _calm_phase(url, keys["calm"], calm_job.json()["id"], hook_job, receiver, options.phase_s)
        return {**figures, "api_cpu_share": (cpu_s(pid) - cpu_before) / (time.monotonic() - t0)}

    figures: dict[str, Any] = {"options": options.__dict__, "peak_rss_mib": {}}
    _settled(pid)
    # Calm's first second on a fresh API process held GETs of 30-100 ms (first use of its code
    # paths), as many as a p99 of 400 counts: warmed up first, untimed, "alone" is the steady state.
    _calm_phase(url, keys["calm"], calm_job.json()["id"], hook_job, receiver, WARM_UP_S)
    _settled(pid)
    figures["peak_rss_mib"]["start"] = status_kib(pid, "VmHWM") / 1024
    figures["alone"] = calm()
    log(f"two tenants, calm alone: {json.dumps(figures['alone'])}")
    figures["peak_rss_mib"]["after_alone"] = status_kib(pid, "VmHWM") / 1024
    hostile.resume()
    flood.resume()
    loads_cpu_before = cpu_s(hostile.pid) + cpu_s(flood.pid)
    figures["beside"] = calm()
    figures["hostile_client_cpu_share"] = (cpu_s(hostile.pid) + cpu_s(flood.pid) - loads_cpu_before) / options.phase_s
    figures["hostile"] = {**hostile.stop(), "gallery_flood": {"statuses": flood.stop()}}
    figures["dead_endpoint_connections"] = dead.accepted
    figures["peak_rss_mib"]["after_beside"] = status_kib(pid, "VmHWM") / 1024
    figures["peak_rss_mib"]["batch_process_after_beside"] = _children_kib(pid, "VmHWM") / 1024
    log(f"two tenants, calm beside hostile: {json.dumps(figures['beside'])}")
    figures["alone_after"] = calm()
    log(f"two tenants, calm alone after: {json.dumps(figures['alone_after'])}")
    figures["peak_rss_mib"]["batch_process_idle_after"] = _children_kib(pid, "VmRSS") / 1024
    return {**figures, **ratios(figures)}


def _children(pid: int) -> dict[int, dict[str, str]]:
    """/proc/CHILD/status fields of the processes `pid` started (its batch processes), by pid."""
    found = {}
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
        except OSError:  # it ended meanwhile
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found[int(status.parent.name)] = fields
    return found


def _children_kib(pid: int, field: str) -> int:
    """The largest `field` of /proc/PID/status (VmHWM: peak RSS, VmRSS: RSS now; KiB) among the processes
    `pid` started: its batch processes; 0 if none."""
    return max([0, *(int(f[field].split()[0]) for f in _children(pid).values() if field in f)])


def _settled(pid: int, *, quiet_share: float = 0.05, timeout_s: float = 60.0) -> None:
    """Wait until the API process and its batch processes (started with it) use under `quiet_share`
    of a core over a second: calm's first phase must not time their start-up."""
    deadline = time.monotonic() + timeout_s

    def used() -> float:
        total = cpu_s(pid)
        for child in _children(pid):
            with contextlib.suppress(OSError):
                total += cpu_s(child)
        return total

    while time.monotonic() < deadline:
        before = used()
        time.sleep(1.0)
        if used() - before < quiet_share:
            return


def ratios(figures: dict[str, Any]) -> dict[str, Any]:
    """Beside over alone, for the goals (each <= GOAL_RATIO)."""
    alone, beside = figures["alone"], figures["beside"]

    def ratio(key: str) -> float | None:
        a, b = alone.get(key), beside.get(key)
        return b / a if a and b is not None else None

    out = {
        "p50_ratio": ratio("get_p50_ms"),
        "p99_ratio": ratio("get_p99_ms"),
        "webhook_median_ratio": ratio("webhook_delay_median_s"),
        "webhook_max_ratio": ratio("webhook_delay_max_s"),
    }
    out["goals_met"] = all((r := out[k]) is not None and r <= GOAL_RATIO for k in ("p99_ratio", "webhook_median_ratio"))
    return out


def _num(value: Any, digits: int = 1) -> str:
    return f"{value:,.{digits}f}" if isinstance(value, int | float) else "-"


def to_markdown(f: dict[str, Any]) -> str:
    """The table of calm's figures by phase, the API's peak memory and hostile's answers."""
    rows = [
        ("calm GET of its job, p50 (ms)", "get_p50_ms", "p50_ratio", 1),
        ("calm GET of its job, **p99** (ms)", "get_p99_ms", "p99_ratio", 1),
        ("calm webhook delay, **median** (s)", "webhook_delay_median_s", "webhook_median_ratio", 2),
        ("calm webhook delay, max (s)", "webhook_delay_max_s", "webhook_max_ratio", 2),
    ]
    lines = [
        "| | alone | beside hostile | beside / alone (goal <= 2x: p99, webhook median) | alone after |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for label, key, ratio_key, digits in rows:
        values = " | ".join(_num(f[phase][key], digits) for phase in ("alone", "beside"))
        lines.append(f"| {label} | {values} | **{_num(f[ratio_key], 2)}x** | {_num(f['alone_after'][key], digits)} |")
    samples = " / ".join(f"{f[p]['gets']} GETs, {f[p]['webhooks']} webhooks" for p in PHASES)
    rss = f["peak_rss_mib"]
    answers = "; ".join(f"{name} {_statuses(t['statuses'])}" for name, t in f["hostile"].items())
    lines += [
        "",
        f"Samples (alone / beside / alone after): {samples}. Phases of {_num(f['options']['phase_s'], 0)} s.",
        "",
        f"API peak RSS (VmHWM): {_num(rss['start'], 0)} MiB after set-up, {_num(rss['after_alone'], 0)} MiB after "
        f"calm alone, **{_num(rss['after_beside'], 0)} MiB** after the hostile phase; its largest batch process "
        f"(IPAB_API_BATCH_PROCESSES), {_num(rss['batch_process_after_beside'], 0)} MiB at its peak, "
        f"{_num(rss.get('batch_process_idle_after'), 0)} MiB idle at the end.",
        "",
        f"Hostile's answers by status: {answers}. Slow DNS: {f.get('slow_dns', 'in a loopback-only namespace')}.",
    ]
    return "\n".join(lines)


def _statuses(statuses: dict[str, int]) -> str:
    return "(" + ", ".join(f"{status}: {n}" for status, n in sorted(statuses.items(), key=str)) + ")"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase-s", type=float, default=Options.phase_s)
    parser.add_argument("--invalid-mib", type=int, default=Options.invalid_mib)
    parser.add_argument("--max-rows", type=int, default=Options.max_rows)
    parser.add_argument("--max-mib", type=int, default=Options.max_mib)
    parser.add_argument("--no-slow-dns", dest="slow_dns", action="store_false")
    parser.add_argument("--only", default="", help="comma-separated attacks of hostile's to run (default: all)")
    return parser


def _options(argv: list[str]) -> Options:
    args = _parser().parse_args(argv)
    only = tuple(a for a in args.only.split(",") if a)
    return Options(args.phase_s, args.invalid_mib, args.max_rows, args.max_mib, args.slow_dns, only)


def main(argv: list[str]) -> dict[str, Any]:
    """The scenario as `devkit.netns` runs it (inside the namespace)."""
    return scenario(_options(argv))


def run(options: Options) -> dict[str, Any]:
    """The scenario in a loopback-only namespace; here, without slow DNS, where namespaces are refused."""
    argv = [
        f"--phase-s={options.phase_s}",
        f"--invalid-mib={options.invalid_mib}",
        f"--max-rows={options.max_rows}",
        f"--max-mib={options.max_mib}",
        f"--only={','.join(options.only)}",
    ]
    if not options.slow_dns:
        return {**scenario(options), "slow_dns": "left out (--no-slow-dns)"}
    try:
        return run_isolated("bench.two_tenants", *argv, timeout_s=600 + 3 * options.phase_s)
    except NamespaceRefused as e:
        log(f"two tenants: no network namespace ({e}); running without the slow-DNS attack")
        figures = scenario(dataclasses.replace(options, slow_dns=False))
        return {**figures, "slow_dns": f"left out: {e}"}


if __name__ == "__main__":
    import sys

    figures = run(_options(sys.argv[1:]))
    print(json.dumps(figures, indent=2))
    print(to_markdown(figures))
