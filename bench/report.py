"""Turning one run's figures into the goals table, a console summary and BENCHMARKS.md."""

from __future__ import annotations

from collections.abc import Collection, Iterator
from typing import Any, Final, NamedTuple

from bench import startup
from bench.api import worst
from bench.overhead import CLI_STEPS, TWO_STEPS, WHOLE_JOBS

OVERHEAD_GOAL: Final = 1.05
WHOLE_GOAL: Final = 1.1  # issue 22: what a user waits for, ipab's three commands / the bare loop
WHOLE_COMMANDS: Final = "`ipab submit` + `ipab status --watch` + `ipab results`"
TWO_COMMANDS: Final = "`ipab submit --watch` + `ipab results`"
NOT_MEASURED: Final = "not measured in this run"
FLOOR_GOAL: Final = 3.0
NAIVE_GOAL: Final = 10.0
CONTROL_GOAL_JOBS_PER_S: Final = 500.0
CENTRAL_GOAL_MS: Final = 0.8  # central CPU per job on PostgreSQL: one core carries > 1,000 jobs/s
DATABASES: Final = ("sqlite", "postgres")


class Goal(NamedTuple):
    """One goal of the benchmarks issue and what this run measured for it."""

    name: str
    target: str
    measured: str
    met: bool | None  # None: not measured in this run


def _num(value: Any, digits: int = 2) -> str:
    return f"{value:,.{digits}f}" if isinstance(value, int | float) else "-"


def _failed(section: Any) -> str | None:
    """Why a section has no figures (failed, skipped, not run), or None when it has them."""
    if not isinstance(section, dict):
        return "not run"
    if "error" in section:
        return f"failed: {section['error'][:200]}"
    skipped = section.get("skipped")
    return skipped if isinstance(skipped, str) else None


def _part(results: dict[str, Any], key: str, db: str | None = None) -> tuple[dict[str, Any] | None, str]:
    """(figures, "") of one benchmark (and database), or (None, why there are none)."""
    section = results.get(key)
    if db is not None and _failed(section) is None:
        section = section.get(db) if isinstance(section, dict) else None
    why = _failed(section)
    return (section, "") if why is None and isinstance(section, dict) else (None, why or "not run")


def _goal(name: str, target: str, measured: str, met: bool) -> Goal:
    return Goal(name, target, measured, met)


def goals(results: dict[str, Any]) -> list[Goal]:
    """Every goal with its measured value, met or not (None: not measured)."""
    out: list[Goal] = []
    out += _overhead_goals(results)
    out += _whole_goals(results)
    for db in DATABASES:
        out += _submit_goals(results, db)
        cp, why = _part(results, "control", db)
        name, target = f"control plane, 4 null workers ({db})", f">= {CONTROL_GOAL_JOBS_PER_S:.0f} jobs/s"
        if cp:
            rate = cp["steady_state_jobs_per_s"]
            out.append(_goal(name, target, f"{_num(rate, 0)} jobs/s", rate >= CONTROL_GOAL_JOBS_PER_S))
        else:
            out.append(Goal(name, target, why, None))
    out += _central_goals(results)
    out += _fairness_goals(results)
    out += _api_goals(results)
    out += _startup_goals(results)
    out += _usage_goals(results)
    out += _fast_set_goals(results)
    out += _isolation_goals(results)
    e, why = _part(results, "embed")
    if e and "redis_p50_ok" in e:
        target = f"<= {e.get('goal_redis_p50_ms')} ms"
        out.append(_goal("embedding cache Redis hit p50", target, "see section 4", bool(e["redis_p50_ok"])))
    else:
        out.append(Goal("embedding cache Redis hit p50", "<= 2.0 ms", why or "not measured", None))
    out += _growth_goals()
    return out


def _growth_goals() -> list[Goal]:
    """Table growth's goals: `bench.table_growth` runs on its own (10M rows take half an hour to load);
    `carry_over` keeps its last figures."""
    rows = (("claim a job", "<= 1.5x"), ("dispatch round", "<= 1.5x"), ("GET /v1/batches/{id}", "<= 2x"))
    how = "run on its own: python -m bench.table_growth"
    return [Goal(f"{name}, 10M / 10k finished rows (PostgreSQL, p50)", target, how, None) for name, target in rows]


def overhead_runs(o: dict[str, Any]) -> list[dict[str, Any]]:
    """One figure set per torch thread count (a run from before the default-thread row had one)."""
    runs: list[dict[str, Any]] = o.get("by_threads") or [o]
    return runs


def _threads_text(run: dict[str, Any]) -> str:
    threads, used = str(run["torch_threads"]), run.get("torch_threads_used")
    if threads == "default":
        return f"default torch threads ({used})" if used else "default torch threads"
    return f"{threads} torch thread{'' if threads == '1' else 's'}"


def _overhead_goals(results: dict[str, Any]) -> list[Goal]:
    o, why = _part(results, "overhead")
    target = f"<= {OVERHEAD_GOAL}"
    name = "system overhead (ipab / bare, s per job), {}".format
    if not o:  # the rows a run gives, so that `carry_over` keeps their last figures
        return [Goal(name(_threads_text({"torch_threads": label})), target, why, None) for label in ("default", "1")]
    goals_out = []
    for run in overhead_runs(o):
        threads = _threads_text({"torch_threads": run["torch_threads"]})  # the row's name: the same on any machine
        used = run.get("torch_threads_used") if run["torch_threads"] == "default" else None
        measured = _num(run["ratio"], 3) + (f" ({used} threads)" if used else "")
        goals_out.append(_goal(name(threads), target, measured, run["ratio"] <= OVERHEAD_GOAL))
    return goals_out


def _whole_part(results: dict[str, Any]) -> tuple[dict[str, Any] | None, str]:
    """(figures, "") of the whole-system measurement, or (None, why there are none): a run from
    before it has no `whole` in its overhead figures."""
    o, why = _part(results, "overhead")
    if not o:
        return None, why
    whole = o.get("whole")
    if not isinstance(whole, dict):
        return None, NOT_MEASURED
    failed = _failed(whole)
    return (None, failed) if failed else (whole, "")


def _whole_goals(results: dict[str, Any]) -> list[Goal]:
    """Issue 22's whole-system ratio at each thread count (the rows a run gives, measured or not)."""
    w, why = _whole_part(results)
    jobs = w["jobs"] if w else WHOLE_JOBS
    name = f"whole system, {jobs} jobs: {WHOLE_COMMANDS} / bare loop, {{}}".format
    target = f"<= {WHOLE_GOAL}"
    if not w:
        return [Goal(name(_threads_text({"torch_threads": label})), target, why, None) for label in ("default", "1")]
    goals_out = []
    for run in w["by_threads"]:
        used = run.get("torch_threads_used") if run["torch_threads"] == "default" else None
        threads = _threads_text({"torch_threads": run["torch_threads"]})
        # The goal's flow: `ipab submit --watch` + `ipab results` where the run measured it, else the three commands.
        two = run.get("two_commands") or {}
        flow, figures = (TWO_COMMANDS, two) if two else (WHOLE_COMMANDS, run)
        seconds = f"{_num(figures['ipab_s'], 1)} s / {_num(run['bare_loop_s'], 1)} s" + (
            f", {used} threads" if used else ""
        )
        measured = f"{_num(figures['ratio'], 3)} ({seconds})"
        goal_name = f"whole system, {w['jobs']} jobs: {flow} / bare loop, {threads}"
        goals_out.append(_goal(goal_name, target, measured, figures["ratio"] <= WHOLE_GOAL))
    return goals_out


def _central_goals(results: dict[str, Any]) -> list[Goal]:
    """Central CPU per job (SQL server, Redis, control loops) on PostgreSQL; the fleet one core carries."""
    cp, why = _part(results, "control", "postgres")
    name, target = "central CPU per job (PostgreSQL + Redis + control loops)", f"<= {CENTRAL_GOAL_MS} ms"
    if not cp or "central" not in cp["cpu_ms_per_job"]:
        return [Goal(name, target, why or "not measured", None)]
    central = cp["cpu_ms_per_job"]["central"]
    fleet = cp["fleet_per_central_core"]
    measured = f"{_num(central, 3)} ms ({_num(fleet['1'], 0)} / {_num(fleet['4'], 0)} GPUs per core at 1 / 4 s)"
    return [_goal(name, target, measured, central <= CENTRAL_GOAL_MS)]


def _control_rate(results: dict[str, Any]) -> float | None:
    cp, _ = _part(results, "control", "sqlite")
    return float(cp["steady_state_jobs_per_s"]) if cp else None


def _fairness_goals(results: dict[str, Any]) -> list[Goal]:
    f, why = _part(results, "fairness")
    names = [
        ("interactive start delay p95, 20k bulk queued", "<= 2 job durations"),
        ("same, submitted by `ipab submit --lane interactive`", "<= 2 job durations"),
        ("tenant b's share of starts (a has 20k queued)", "45-55%"),
        ("throughput, lanes / FIFO", ">= 0.95"),
        ("dispatcher capacity / control plane jobs/s", ">= 5x"),
    ]
    if not f:
        return [Goal(name, target, why, None) for name, target in names]
    policy, job_s = f["policy"], f["job_s"]
    delay = policy["probe_delay_p95_s"] / job_s
    share, ratio = policy["tenant_b_share"], f["throughput_ratio"]
    control = _control_rate(results)
    capacity = f["dispatcher"]["jobs_per_s"] / control if control else None
    cli_s = policy.get("cli_probe_delay_p95_s")
    cli = cli_s / job_s if cli_s is not None else None
    return [
        _goal(names[0][0], names[0][1], f"{_num(delay, 1)} job durations", delay <= 2),
        Goal(
            names[1][0],
            names[1][1],
            f"{_num(cli, 1)} job durations" if cli is not None else "not run",
            cli <= 2 if cli is not None else None,
        ),
        _goal(names[2][0], names[2][1], f"{share:.0%}", 0.45 <= share <= 0.55),
        _goal(names[3][0], names[3][1], _num(ratio, 3), ratio >= 0.95),
        Goal(
            names[4][0],
            names[4][1],
            f"{_num(capacity, 1)}x" if capacity else "control plane not run",
            capacity >= 5 if capacity else None,
        ),
    ]


def _submit_goals(results: dict[str, Any], db: str) -> list[Goal]:
    sub, why = _part(results, "submit", db)
    floor_name, naive_name = f"submit vs raw LPUSH floor ({db})", f"submit vs naive apply_async ({db})"
    floor_target, naive_target = f"<= {FLOOR_GOAL}x slower", f">= {NAIVE_GOAL}x faster"
    if not sub:
        return [Goal(floor_name, floor_target, why, None), Goal(naive_name, naive_target, why, None)]
    return [
        _goal(floor_name, floor_target, f"{_num(sub['x_floor'])}x", sub["x_floor"] <= FLOOR_GOAL),
        _goal(naive_name, naive_target, f"{_num(sub['x_naive'])}x", sub["x_naive"] >= NAIVE_GOAL),
    ]


def _verdict(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "not measured"}[met]


def summary_lines(results: dict[str, Any]) -> list[str]:
    """A short console summary: one line per goal."""
    lines = ["", "ipab benchmarks: goals"]
    for g in goals(results):
        lines.append(f"  {g.name:<48} {g.measured:>16}  (goal {g.target}): {_verdict(g.met).strip('*')}")
    lines.append(f"  total {results.get('total_s', 0):.0f} s")
    return lines


def _machine(results: dict[str, Any]) -> Iterator[str]:
    m = results["machine"]
    yield f"- Date: {m['date']}"
    yield f"- Machine: {m['cpu']}, {m['cores']} cores, {m['os']}; Python {m['python']}"
    yield f"- Load average (1 min) when the run started: {m['load_average_1m_at_start']} (other work shares the cores)"
    yield f"- PostgreSQL at 127.0.0.1:5432: {'yes' if results.get('postgres') else 'not reachable, skipped'}"


def _overhead(o: dict[str, Any]) -> Iterator[str]:
    yield "## 1. System overhead (tiny model set, one worker)"
    yield ""
    if _failed(o):
        yield f"{_failed(o)}"
        return
    row, runs = o["row"], overhead_runs(o)
    yield (
        f"{o['jobs']} jobs ({row['width']}x{row['height']} px, {row['steps']} steps, CFG 5.0) through ipab "
        f"(submit, one `ipab worker`, SeaweedFS S3, SQLite) against a bare diffusers loop "
        f"(`StableDiffusionXLPipeline` + `load_ip_adapter` on the same files, each reference encoded once, "
        f"PNGs to local disk). Both with the same torch threads, measured at "
        f"{' and at '.join(_threads_text(r) for r in runs)} (`OMP_NUM_THREADS`, `torch.set_num_threads`): "
        "at the default every cycle the worker's own threads spend is taken from the render; at one thread "
        "the other core absorbs them, as the CPU does beside a GPU. Steady state = (last finish - first "
        "finish) / (n - 1): model load and worker start fall before the first finish. The two alternate, "
        f"{o.get('rounds', 1)} rounds each (order flipped every round); medians shown, every round listed."
    )
    yield ""
    yield "| torch threads | bare s/job (median) | ipab s/job (median) | **ratio ipab / bare** | rounds: bare; ipab |"
    yield "| --- | ---: | ---: | ---: | --- |"
    for r in runs:
        rounds = "; ".join(", ".join(_num(v, 3) for v in r.get(f"{k}_rounds", [])) for k in ("bare", "ipab"))
        yield (
            f"| {_threads_text(r)} | {_num(r['bare_s_per_job'], 4)} | {_num(r['ipab_s_per_job'], 4)} "
            f"| **{_num(r['ratio'], 3)}** (goal <= {OVERHEAD_GOAL}) | {rounds} |"
        )
    for r in runs:
        means = r.get("ipab_row_means", {})
        yield ""
        yield (
            f"ipab's own job rows, {_threads_text(r)}: encode (cache) {_num(means.get('encode_s'), 4)} s, denoise "
            f"{_num(means.get('denoise_s'), 4)} s, upload {_num(means.get('upload_s'), 4)} s per job on average "
            "(the upload runs on the publisher thread, overlapped with the next job's denoising)."
        )
    yield ""
    yield from _whole(o.get("whole"))


def _whole(w: Any) -> Iterator[str]:
    """Issue 22's whole-system figures: what a user waits for, against the bare loop."""
    if not isinstance(w, dict) or _failed(w):
        why = _failed(w) if isinstance(w, dict) else NOT_MEASURED
        yield f"Whole system ({WHOLE_COMMANDS} against the bare loop): {why}."
        return
    yield (
        f"Whole system (issue 22): what a user waits for on a {w['jobs']}-job batch of the same rows. ipab: ONE "
        f"`ipab worker` already running with its model loaded (started on a fresh SQLite database, then a "
        f"{w['warm_jobs']}-job warm-up batch run to completion on a reference the timed batch does not use); then, "
        "as a user at a shell runs them one after another, each a fresh process: `ipab submit MANIFEST --batch NAME`, "
        "`ipab status NAME --watch` (until every job is final), `ipab results NAME > FILE`; timed from just before "
        "the submit starts to the end of `ipab results` (every job succeeded, one results line each). Bare loop: the "
        "same rows through the bare loop above, from before its first pipeline call (reference encodings included) "
        "to the last PNG written; imports and model load are not counted: the baseline is the loop a user writes "
        "with the model already loaded. Bare process: that loop's whole process, interpreter start to exit "
        "(imports and model load included), for context. Alternating with the runs above, same rounds; medians "
        "(each part's own median, so the parts need not add up to the whole)."
    )
    yield ""
    yield (
        "| torch threads | bare loop s | bare process s | ipab s (submit + watch + results) "
        "| **ratio ipab / bare loop** | ratio ipab / bare process | rounds: bare loop; ipab |"
    )
    yield "| --- | ---: | ---: | ---: | ---: | ---: | --- |"
    yield from (_whole_row(r) for r in w["by_threads"])
    for r in w["by_threads"]:
        if "ipab_watch_parts" in r:
            yield ""
            yield _watch_parts(r)
    if any(r.get("two_commands") for r in w["by_threads"]):
        yield from _two_commands(w)


def _two_commands(w: dict[str, Any]) -> Iterator[str]:
    """The same batch through `ipab submit --watch` + `ipab results`: the watch in the submit's process."""
    yield ""
    yield (
        f"The same rows through {TWO_COMMANDS} (the submission, then the same watch in the same process: one "
        "command's start-up fewer), another batch on the same worker in the same round; which of the two batches "
        "goes first alternates by round (the second finds the worker's caches warmer). The goal rows use this flow."
    )
    yield ""
    yield (
        "| torch threads | bare loop s | ipab s (submit --watch + results) | **ratio ipab / bare loop** "
        "| ratio ipab / bare process | first job started after the submit's start s | worker span s "
        "| watch exit after the last finish s | rounds: ipab |"
    )
    yield "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"
    for r in w["by_threads"]:
        two = r.get("two_commands")
        if not two:
            continue
        steps = " + ".join(_num(two[f"ipab_{step}"], 2) for step in TWO_STEPS)
        parts = two["parts"]
        yield (
            f"| {_threads_text(r)} | {_num(r['bare_loop_s'], 2)} | {_num(two['ipab_s'], 2)} ({steps}) "
            f"| **{_num(two['ratio'], 3)}** (goal <= {WHOLE_GOAL}) | {_num(two['ratio_process'], 3)} "
            f"| {_num(parts['first_start_after_start_s'], 2)} | {_num(parts['worker_span_s'], 2)} "
            f"| {_num(parts['watch_end_after_last_finish_s'], 2)} | {', '.join(_num(v, 2) for v in two['rounds'])} |"
        )


def _whole_row(r: dict[str, Any]) -> str:
    """One thread count's row of the whole-system table."""
    parts = " + ".join(_num(r[f"ipab_{step}"], 2) for step in CLI_STEPS)
    rounds = r.get("rounds", {})
    loops = ", ".join(_num(v, 2) for v in rounds.get("bare_loop_s", []))
    ipabs = ", ".join(_num(v.get("ipab_s"), 2) for v in rounds.get("ipab", []))
    return (
        f"| {_threads_text(r)} | {_num(r['bare_loop_s'], 2)} | {_num(r['bare_process_s'], 2)} "
        f"| {_num(r['ipab_s'], 2)} ({parts}) | **{_num(r['ratio'], 3)}** (goal <= {WHOLE_GOAL}) "
        f"| {_num(r['ratio_process'], 3)} | {loops}; {ipabs} |"
    )


def _watch_parts(r: dict[str, Any]) -> str:
    """Where `ipab status --watch`'s seconds went, from the job rows' times (medians)."""
    parts = r["ipab_watch_parts"]
    return (
        f"Where the watch's {_num(r['ipab_watch_s'], 2)} s went, {_threads_text(r)}: the first job started "
        f"{parts['first_start_after_submit_s']:+.2f} s from `ipab submit`'s exit (dispatcher and worker pick-up; "
        f"below 0: before the process had exited), the worker took {_num(parts['worker_span_s'], 2)} s from the "
        f"first job's start to the last one's finish (the bare loop: {_num(r['bare_loop_s'], 2)} s), and "
        f"`ipab status --watch` exited {_num(parts['watch_end_after_last_finish_s'], 2)} s after the last finish."
    )


def _submit(s: dict[str, Any]) -> Iterator[str]:
    yield "## 2. Submit throughput"
    yield ""
    if _failed(s):
        yield f"{_failed(s)}"
        return
    yield (
        f"`ipab submit` (`submit_manifest` in-process: parse and validate, read and upload {s['references']} "
        f"references, insert with executemany or COPY; since lanes, submission writes SQL only and the dispatcher "
        f"feeds Redis) of a {s['rows']:,}-row manifest, against the floor "
        "(the same Celery messages built with `celery_envelope` and pushed with a pipelined raw `LPUSH`, "
        f"5,000 per round trip) and a naive loop of `apply_async` (timed on {s['naive_sample']:,} messages, "
        "rows/s extrapolated)."
    )
    yield ""
    yield (
        "| database | ipab rows/s | floor rows/s (push only) | naive rows/s | ipab time / floor "
        "| ipab / naive rate | dispatcher rows/s (whole backlog to Redis) |"
    )
    yield "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    for db in DATABASES:
        f = s.get(db, {})
        if _failed(f):
            yield f"| {db} | {_failed(f)} | | | | | |"
            continue
        yield (
            f"| {db} | {_num(f['submit_rows_per_s'], 0)} "
            f"| {_num(f['floor_rows_per_s'], 0)} "
            f"({_num(f['floor_push_only_rows_per_s'], 0)}) | {_num(f['naive_rows_per_s'], 0)} | "
            f"**{_num(f['x_floor'])}x** (goal <= {FLOOR_GOAL}) | **{_num(f['x_naive'])}x** (goal >= {NAIVE_GOAL}) "
            f"| {_num(f.get('dispatch_rows_per_s'), 0)} |"
        )


def _control(c: dict[str, Any]) -> Iterator[str]:
    yield "## 3. Control-plane capacity (NullRenderer, 4 worker processes)"
    yield ""
    if _failed(c):
        yield f"{_failed(c)}"
        return
    rounds = int(c.get("rounds", 1))
    yield (
        f"{c['jobs']:,} jobs through `python -m bench.null_worker worker` x {c['workers']} (the normal `ipab worker` "
        "code path with `bench.null_model.NullRenderer`, a benchmark fixture that returns a fixed 64x64 "
        "image at once), logging JSON lines as deploy/kubernetes configures a fleet: Redis, SQL claim and "
        "finish, embedding cache, PNG, SeaweedFS S3. Steady state = "
        "(n - 1) / (last - first `finished_at`); end to end includes the submission. CPU per job: CPU seconds "
        "each process family spent during the batch / jobs. Central: the backends of this run's PostgreSQL "
        "database, Redis, and the control loops (dispatcher, reconciler, janitor) in one `ipab reconcile "
        "--loop` process (workers run with IPAB_RECONCILE_IN_WORKERS=false); the fleet one central core "
        "carries = 1 s / central CPU per job x seconds per image."
        + (
            f" {rounds} batches of {c['jobs']:,} jobs one after another on the same workers, per database; "
            "the table shows the round whose central CPU per job is the median (every figure of a row from "
            "that one round), and every round is listed below it."
            if rounds > 1
            else ""
        )
    )
    yield ""
    yield (
        "| database | steady state jobs/s | end to end jobs/s | central CPU ms per job: SQL / Redis / control loops "
        "= total | GPUs per central core at 1 / 4 s per image | workers / S3 CPU ms per job |"
    )
    yield "| --- | ---: | ---: | ---: | ---: | ---: |"
    for db in DATABASES:
        f = c.get(db)
        if not isinstance(f, dict):
            continue
        cpu = f["cpu_ms_per_job"]
        central = " / ".join(_num(cpu.get(k, 0.0), 3) for k in ("postgres", "redis", "control"))
        central += f" = **{_num(cpu.get('central'), 3)}**"
        fleet = f.get("fleet_per_central_core", {})
        fleet_text = f"{_num(fleet.get('1'), 0)} / {_num(fleet.get('4'), 0)}"
        rates = f"**{_num(f['steady_state_jobs_per_s'], 0)}** | {_num(f['end_to_end_jobs_per_s'], 0)}"
        others = f"{_num(cpu.get('workers'), 1)} / {_num(cpu.get('s3'), 1)}"
        yield f"| {db} | {rates} | {central} | {fleet_text} | {others} |"
    yield ""
    for db in DATABASES:
        f = c.get(db)
        if isinstance(f, dict) and len(f.get("rounds", [])) > 1:
            listed = "; ".join(
                f"{_num(r['central_ms'], 3)} ms at {_num(r['steady_state_jobs_per_s'], 0)} jobs/s" for r in f["rounds"]
            )
            yield f"Every round on {db}, in order (central CPU per job at steady-state jobs/s): {listed}."
            yield ""
    pg = c.get("postgres")
    if isinstance(pg, dict) and "census" in pg:
        from bench.job_cost import to_markdown as census_markdown

        commits = pg.get("sql_commits_per_job")
        yield (
            f"What a job costs PostgreSQL, step by step (`bench.job_cost`, one job at a time on this run's "
            f"database; the run above committed {_num(commits, 2)} transactions per job):"
        )
        yield ""
        yield census_markdown(pg["census"])
        yield ""
        commands = pg.get("redis_commands_per_job", {})
        listed = ", ".join(
            f"{name} {_num(v['calls_per_job'], 2)}" for name, v in commands.items() if v["calls_per_job"] >= 0.05
        )
        yield f"Redis commands per job in the run above (`INFO commandstats`): {listed}."
        yield ""
    yield "Where a worker's time goes: one job's steps timed one after another in a single process (ms per job):"
    yield ""
    for db in DATABASES:
        f = c.get(db)
        if isinstance(f, dict) and "steps_ms" in f:
            steps = ", ".join(f"{k} {_num(v, 2)}" for k, v in f["steps_ms"].items())
            yield f"- {db}: {steps}"


def _embed(e: dict[str, Any]) -> Iterator[str]:
    yield "## 4. Embedding cache"
    yield ""
    yield _failed(e) or e.get("markdown", "(no table)")


def _api(a: dict[str, Any]) -> Iterator[str]:
    yield "## 8. HTTP API"
    yield ""
    yield _failed(a) or a.get("markdown", "(no table)")


def _api_goals(results: dict[str, Any]) -> list[Goal]:
    a, why = _part(results, "api")
    names = [
        ("API: POST /v1/jobs p50 / bare endpoint p50 (worst database)", "<= 3x"),
        ("API: 10k-row batch / ipab submit (worst database)", "<= 1.5x"),
    ]
    if not a:
        return [Goal(name, target, why, None) for name, target in names]
    p50, batch = worst(a, "jobs"), worst(a, "batch")
    return [
        _goal(names[0][0], names[0][1], f"{_num(p50)}x", p50 <= 3),
        _goal(names[1][0], names[1][1], f"{_num(batch)}x", batch <= 1.5),
    ]


def _batching(b: dict[str, Any]) -> Iterator[str]:
    yield "## 7. Micro-batching (tiny model, CPU)"
    yield ""
    yield _failed(b) or b.get("markdown", "(no table)")


def _fairness(f: dict[str, Any], control_jobs_per_s: float | None) -> Iterator[str]:
    from bench.fairness import to_markdown

    yield "## 6. Lanes and fair share (null workers, fixed job length)"
    yield ""
    yield _failed(f) or to_markdown(f, control_jobs_per_s=control_jobs_per_s)


def gpu_section(g: dict[str, Any] | None) -> Iterator[str]:
    """Section 5: the GPU sweep of `bench/gpu.py` and its worker path, or how to run it."""
    yield "## 5. GPU (full-size SDXL + ip-adapter_sdxl, random weights)"
    yield ""
    if not g:
        yield (
            "Not run: this machine has no GPU. `bench/gpu.py` is ready: `python -m bench.gpu --out gpu.json` on "
            "a GPU machine (no network needed; < 8 min on an H100), then `python -m bench.run --gpu-json gpu.json`. "
            "`python -m bench.gpu --smoke --out smoke.json` runs tiny configs on the CPU to prove the script."
        )
        return
    size = f"{g['size_px']}x{g['size_px']}"
    flops = _num(g["tflop_per_image"], 1)
    yield f"{g['device']}, {g['dtype']}, {size}, {g['steps']} steps, CFG; {flops} TFLOP per image (flop_counter)."
    yield ""
    yield "| configuration | s/image | images/min | peak GiB | TFLOP/s | utilisation | vs baseline |"
    yield "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    for r in g["configs"]:
        if "s_per_image" not in r:
            yield f"| {r['name']} | {r.get('error') or r.get('skipped')} | | | | | |"
            continue
        util = f"{100 * r['utilisation']:.0f}%" if r.get("utilisation") else "-"
        yield (
            f"| {r['name']} | {_num(r['s_per_image'], 3)} | {_num(r['images_per_min'], 1)} "
            f"| {_num(r['peak_mem_gib'], 1)} "
            f"| {_num(r['tflops_achieved'], 0)} | {util} | {_num(r.get('speedup_vs_baseline'))}x |"
        )
    yield ""
    yield from _worker_path(g.get("worker_path"))
    yield from _fast_set_gpu(g.get("fast_set"))


def _worker_path(w: dict[str, Any] | None) -> Iterator[str]:
    """The same weights through the whole system (submit, SQL, dispatcher, one worker, S3)."""
    if not w:
        return
    if "s_per_image" not in w:
        yield f"Worker path (whole system, one worker): {w.get('error') or w.get('skipped')}."
        return
    sizes = ", ".join(f"{count} at {size}" for size, count in w["render_batch_sizes"].items())
    yield (
        f"Worker path: {w['succeeded']} jobs through `ipab worker` (SQL, dispatcher, Redis, S3) on the same "
        f"weights, batch size {w['batch_size']}: {_num(w['s_per_image'], 3)} s/image steady state "
        f"({_num(w['images_per_s'], 2)} images/s; jobs per pipeline call: {sizes}) against "
        f"{_num(w['pipeline_s_per_image'], 3)} s/image for `{w['pipeline']}` in process: "
        f"**{_num(w['worker_over_pipeline'])}x** (goal about 1). Every PNG was found in S3."
    )


def render_markdown(results: dict[str, Any], *, command: str) -> str:
    """The whole BENCHMARKS.md for one run."""
    parts = ["# ipab benchmarks", "", f"Written by `{command}` (`make bench`). Ratios measured in this one run.", ""]
    parts += [
        *_machine(results),
        "",
        "## Goals",
        "",
        "| goal | target | measured | verdict |",
        "| --- | --- | ---: | --- |",
    ]
    parts += [f"| {g.name} | {g.target} | {g.measured} | {_verdict(g.met)} |" for g in goals(results)]
    for section in (
        _overhead(results.get("overhead") or {"skipped": "not run"}),
        _submit(results.get("submit") or {"skipped": "not run"}),
        _control(results.get("control") or {"skipped": "not run"}),
        _embed(results.get("embed") or {"skipped": "not run"}),
        gpu_section(results.get("gpu")),
        _fairness(results.get("fairness") or {"skipped": "not run"}, _control_rate(results)),
        _batching(results.get("batching") or {"skipped": "not run"}),
        _api(results.get("api") or {"skipped": "not run"}),
        _startup(results.get("startup") or {"skipped": "not run"}),
        _fast_sets(results.get("fast_sets") or {"skipped": "not run"}),
        _usage(results.get("usage") or {"skipped": "not run"}),
        _isolation(results.get("isolation") or {"skipped": "not run"}),
        _polling(results.get("polling") or {"skipped": "not run"}),
    ):
        parts += ["", *section]
    return "\n".join(parts) + "\n"


# What a run did not measure: kept from the BENCHMARKS.md before it.

# The section each part of `bench.run` writes, by its heading's number.
SECTION_PARTS: Final = {
    "1": "overhead",
    "2": "submit",
    "3": "control",
    "4": "embed",
    "5": "gpu",
    "6": "fairness",
    "7": "batching",
    "8": "api",
    "9": "startup",
    "10": "fast_sets",
    "11": "usage",
    "13": "isolation",
    "14": "polling",
}
KEPT_NOTE: Final = "(Kept from the previous BENCHMARKS.md: the run that wrote this file did not measure it.)"
EARLIER: Final = " (earlier run)"


def _sections(markdown: str) -> dict[str, str]:
    """`## N. ...` sections of a BENCHMARKS.md by N, each with its heading; "" holds what comes before."""
    out: dict[str, str] = {}
    for i, chunk in enumerate(markdown.split("\n## ")):
        key = "" if i == 0 else chunk.split(None, 1)[0].rstrip(".")
        out[key] = chunk if i == 0 else "## " + chunk
    return out


def _goal_rows(markdown: str) -> dict[str, list[str]]:
    """The goals table's rows by goal name: their cells."""
    rows = {}
    for line in _sections(markdown).get("Goals", "").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[0] not in ("goal", "---"):
            rows[cells[0]] = cells
    return rows


def carry_over(new: str, previous: str, *, ran: Collection[str]) -> str:
    """`new` (this run's BENCHMARKS.md), with what the run did not measure taken from `previous`.

    A section whose part did not run (`--only`), or that comes from a run of its own (table
    growth), is kept as it was, marked as kept; a goal this run did not measure keeps its
    earlier figure and verdict, marked `(earlier run)`. A part that ran and failed says so.
    Goals that `goals` no longer lists (renamed, retired) are not kept.
    """
    old, fresh = _sections(previous), _sections(new)
    earlier = _goal_rows(previous)
    lines = []
    for line in fresh.get("Goals", "").splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        was = earlier.get(cells[0]) if len(cells) == 4 and cells[3] == _verdict(None) else None
        if was is not None and was[3] != _verdict(None):
            measured = was[2] if was[2].endswith(EARLIER) else was[2] + EARLIER
            line = f"| {cells[0]} | {was[1]} | {measured} | {was[3]} |"
        lines.append(line)
    fresh["Goals"] = "\n".join(lines)
    for key, text in old.items():
        part = SECTION_PARTS.get(key)
        if key in ("", "Goals") or (part is not None and part in ran):
            continue
        body = text.rstrip("\n")
        if KEPT_NOTE not in body:
            body += "\n\n" + KEPT_NOTE
        fresh[key] = body + "\n"
    order = sorted((k for k in fresh if k not in ("", "Goals")), key=lambda k: int(k) if k.isdigit() else 999)
    return "\n".join(fresh[k].rstrip("\n") + "\n" for k in ["", "Goals", *order])


# CLI start-up (bench/startup.py): its rows, apart from the sections above.


def _startup_goals(results: dict[str, Any]) -> list[Goal]:
    s, why = _part(results, "startup")
    out = []
    for label, goal in startup.GOALS.items():
        name, target = f"CLI start-up: `{label}` / `{startup.BASELINE}`", f"<= {goal:.1f}x"
        if not s:
            out.append(Goal(name, target, why, None))
            continue
        ratio = s["commands"][label]["over_baseline"]
        out.append(_goal(name, target, f"{_num(ratio)}x", ratio <= goal))
    return out


def _startup(s: dict[str, Any]) -> Iterator[str]:
    yield "## 9. CLI start-up (fresh processes, interleaved)"
    yield ""
    yield _failed(s) or s.get("markdown", "(no table)")


# Fast model sets (bench/fast_sets.py; bench/gpu.py's `fast_set`): a section of their own.

FAST_GOAL: Final = 5.0  # images/s of a 4-step set over the 30-step default set


def _fast_set_goals(results: dict[str, Any]) -> list[Goal]:
    f, why = _part(results, "fast_sets")
    name, target = "fast set (4 steps, no CFG) / default set (30 steps, CFG), tiny model", f">= {FAST_GOAL:g}x images/s"
    if not f:
        return [Goal(name, target, why, None)]
    return [_goal(name, target, f"{_num(f['fast_over_default'])}x", f["fast_over_default"] >= FAST_GOAL)]


# Usage reports (bench/usage.py): a section of their own.


def _usage_goals(results: dict[str, Any]) -> list[Goal]:
    u, why = _part(results, "usage")
    names = {
        "worst_s": "usage report over 1M jobs (worst report, worst database)",
        "scaled_tenant_worst_s": "a tenant's usage report over the rollup of 100M jobs (worst database)",
    }
    if not u:
        return [Goal(name, "< 1 s", why, None) for name in names.values()]
    return [_goal(name, "< 1 s", f"{_num(u[key], 3)} s", u[key] < u["goal_s"]) for key, name in names.items()]


def _usage(u: dict[str, Any]) -> Iterator[str]:
    yield "## 11. Usage reports (the rollup, 1M jobs)"
    yield ""
    yield _failed(u) or u.get("markdown", "(no table)")


def _fast_sets(f: dict[str, Any]) -> Iterator[str]:
    yield "## 10. Fast model sets (tiny model, CPU)"
    yield ""
    yield _failed(f) or f.get("markdown", "(no table)")


def _fast_set_gpu(f: dict[str, Any] | None) -> Iterator[str]:
    """The fast set on the GPU sweep's pipeline: a LoRA fused in, TCD, 4 steps, no guidance."""
    if not f:
        return
    yield ""
    if "images_per_s" not in f:
        yield f"Fast set (LoRA fused, TCD, 4 steps, guidance 0): {f.get('error') or f.get('skipped')}."
        return
    yield (
        f"Fast set: a rank-{f['lora_rank']} LoRA fused in at load ({_num(f['fuse_s'], 1)} s), {f['scheduler']}, "
        f"{f['steps']} steps, guidance {f['guidance_scale']:g}, batch {f['batch']}: {_num(f['images_per_s'], 2)} "
        f"images/s against {_num(f['default_images_per_s'], 2)} for `{f['default']}`: "
        f"**{_num(f['fast_over_default'])}x** (goal >= {FAST_GOAL:g}x)."
    )


# Two tenants, one hostile (bench/two_tenants.py): a section of its own.

ISOLATION_GOAL: Final = 2.0  # calm's figure beside the hostile tenant over alone


def _isolation_goals(results: dict[str, Any]) -> list[Goal]:
    i, why = _part(results, "isolation")
    names = {
        "p99_ratio": "calm p99 beside hostile / alone",
        "webhook_median_ratio": "calm webhook delay beside hostile / alone",
    }
    target = f"<= {ISOLATION_GOAL:g}x"
    if not i:
        return [Goal(name, target, why, None) for name in names.values()]
    return [
        _goal(name, target, f"{_num(i[key])}x", i[key] is not None and i[key] <= ISOLATION_GOAL)
        for key, name in names.items()
    ]


def _polling(p: dict[str, Any]) -> Iterator[str]:
    yield "## 14. Polling a large batch (one `ipab api`, PostgreSQL)"
    yield ""
    yield _failed(p) or p.get("markdown", "(no table)")


def _isolation(i: dict[str, Any]) -> Iterator[str]:
    yield "## 13. Two tenants, one hostile (one API process, SQLite)"
    yield ""
    yield _failed(i) or i.get("markdown", "(no table)")
