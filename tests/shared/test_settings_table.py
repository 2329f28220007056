"""Every bad setting and every unreachable service: exit 2, ONE line naming the variable, no hang.

One table over every `IPAB_*` setting (a setting added without a row fails
`test_every_setting_has_a_row`) and over the commands. Each case runs `ipab` with only its
own `IPAB_*` variables, in a fresh folder. Secrets in URLs must never be printed.

Where a case runs: the first case of each command, every `worker` case (a regression there
would start a worker) and every service case (timed) run the console entry in a subprocess,
in parallel, as a user runs it. The other settings cases call `ipab.cli.main` in this process,
one after another, with the environment, folder, stdout, stderr and root log handler of the
case: a subprocess would prove nothing more for them, and costs a Python start-up and the
command's imports each (about 100 of them took 2-6 minutes of the suite on 2 cores).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from shared.settings import ENV_PREFIX, Settings

SECRET = "s3cr3tpw"
HUNG_BUDGET_S = 15.0
# `ipab.cli.main` timed from after the imports its commands make (each imports what it runs
# when it runs: they are made here first), so the budget measures the command, not a Python
# start-up on a loaded machine; the elapsed seconds go to a file, stderr stays one line.
TIMED_MAIN = (
    "import sys, time; from ipab import cli; cli.build_parser(); "
    "import alembic.command, scheduler.batches.actions, scheduler.batches.record, scheduler.cli.batches, "
    "scheduler.submission.submit, shared.dispatch.position, shared.reconcile, shared.redis_conn, shared.storage; "
    "start = time.monotonic(); "
    "code = cli.main(sys.argv[1:]); open('elapsed_s', 'w').write(str(time.monotonic() - start)); sys.exit(code)"
)
FIX_WORDS = ("fix", "unset", "use ", "set ", "raise", "lower", "at least", "check", "create")
COMMANDS: dict[str, tuple[str, ...]] = {
    "submit": ("submit", "rows.jsonl", "--model-set", "tiny"),
    "status": ("status", "b"),
    "results": ("results", "b"),
    "batches": ("batches",),
    "cancel": ("cancel", "b"),
    "retry": ("retry", "b", "--failed"),
    "reconcile": ("reconcile",),
    "cache": ("cache", "stats"),
    "worker": ("worker",),
}

# Bad values per setting: (value, text the one line must show: the value, or its masked form).
BAD_VALUES: dict[str, list[tuple[str, str]]] = {
    "database_url": [
        ("garbage", "garbage"),
        (f"mysql://u:{SECRET}@h/db", "mysql://u:***@h/db"),
        (f"postgresql+psycopg://u:{SECRET}@h:abc/db", "u:***@h:abc"),
        ("sqlite:////no/such/folder/ipab.db", "/no/such/folder"),
    ],
    "redis_url": [
        (f"redis://:{SECRET}@127.0.0.1:6379/abc", "redis://:***@127.0.0.1:6379/abc"),
        ("garbage", "garbage"),
        ("redis://127.0.0.1:port/0", "port"),
    ],
    "redis_prefix": [("", "''"), ("a b", "a b")],
    "s3_endpoint_url": [("not a url", "not a url"), ("ftp://h/x", "ftp://h/x"), ("http://h:port", "h:port")],
    "s3_bucket": [("Bad_Bucket", "Bad_Bucket"), ("ab", "ab"), ("192.168.1.1", "192.168.1.1")],
    "s3_region": [("us east", "us east")],
    "model_set": [("/no/such/model-set.toml", "/no/such/model-set.toml")],
    "device": [("tpu", "tpu")],
    "dtype": [("float8", "float8")],
    "compile": [("maybe", "maybe")],
    "fuse_qkv": [("maybe", "maybe")],
    "channels_last": [("perhaps", "perhaps")],
    "batch_size": [("0", "0"), ("many", "many")],
    "batch_wait_ms": [("-1", "-1"), ("soon", "soon")],
    "reference_roots": [('["unterminated', "unterminated"), ("/no/such/root", "/no/such/root")],
    "reference_buckets": [("Bad_Bucket", "Bad_Bucket")],
    "cache_lru_bytes": [("-1", "-1"), ("lots", "lots")],
    "cache_redis_ttl_s": [("0", "0"), ("-5", "-5")],
    "cache_lock_ttl_s": [("inf", "inf"), ("nan", "nan")],
    "cache_wait_s": [("-1", "-1")],
    "encoder_placement": [("gpu", "gpu")],
    "lease_s": [("abc", "abc"), ("inf", "inf"), ("1", "1")],  # 1: not longer than the 2 s heartbeat
    "heartbeat_s": [("0", "0"), ("100", "100")],
    "max_attempts": [("0", "0"), ("many", "many")],
    "soft_time_limit_s": [("0", "0"), ("5000", "5000")],
    "hard_time_limit_s": [("99999", "99999")],
    "visibility_timeout_s": [("-1", "-1")],
    "reconcile_interval_s": [("0", "0"), ("inf", "inf")],
    "reconcile_in_workers": [("perhaps", "perhaps")],
    "consumer_stall_s": [("0", "0")],
    "requeue_grace_s": [("-1", "-1")],
    "retry_base_s": [("0", "0")],
    "retry_max_s": [("inf", "inf")],
    "transient_retries": [("-5", "-5"), ("1.5", "1.5")],
    "lane_weights": [("fast=50", "fast"), ("bulk=0", "bulk"), ("bulk", "bulk"), ('{"bulk": "x"}', "x")],
    "tenant_weights": [("a=-1", "-1"), ("a=inf", "inf"), ("=3", "=3")],
    "dispatch_depth": [("0", "0"), ("deep", "deep")],
    "dispatch_horizon_s": [("-1", "-1"), ("soon", "soon")],
    "dispatch_rescan_s": [("inf", "inf")],
    "dispatch_lock_s": [("-1", "-1")],
    "api_max_queued_jobs": [("0", "0")],
    "api_max_body_bytes": [("-1", "-1")],
    "api_max_batch_rows": [("0", "0"), ("many", "many")],
    "api_batch_processes": [("-1", "-1"), ("two", "two")],
    "api_batch_process_min_bytes": [("-1", "-1"), ("1MiB", "1MiB")],
    "api_rate_per_s": [("-1", "-1"), ("inf", "inf"), ("fast", "fast")],
    "api_rate_burst": [("0", "0"), ("1.5", "1.5")],
    "api_body_bytes_per_s": [("-1", "-1"), ("inf", "inf"), ("16MiB", "16MiB")],
    "api_body_burst_bytes": [("0", "0"), ("1000", "IPAB_API_MAX_BODY_BYTES")],
    "api_key_lookups_per_s": [("-1", "-1"), ("inf", "inf")],
    "api_key_lookup_burst": [("0", "0"), ("many", "many")],
    "api_metrics_port": [("-1", "-1"), ("70000", "70000")],
    "metrics_token": [(f"{SECRET} x", "'***'")],  # a secret: refused, never shown
    "metrics_port": [("-1", "-1"), ("70000", "70000"), ("http", "http")],
    "celery_events": [("perhaps", "perhaps")],
    "log_format": [("xml", "xml")],
    "api_image_url_expiry_s": [("0", "0")],
    "idempotency_ttl_s": [("60", "60")],
    "webhook_allow_private": [("perhaps", "perhaps")],
    "webhook_poll_s": [("0", "0")],
    "webhook_timeout_s": [("inf", "inf")],
    "webhook_dns_timeout_s": [("0", "0")],
    "webhook_retry_base_s": [("-1", "-1")],
    "webhook_retry_max_s": [("nan", "nan")],
    "webhook_give_up_s": [("0", "0")],
    "api_key": [(f"{SECRET} x", "'***'")],  # a secret: refused, never shown
    "retention_outputs_s": [("7x", "7x"), ("10m", "10m"), ("9999d", "9999d")],
    "retention_metadata_s": [("-1d", "-1d"), ("soon", "soon")],
    "janitor_interval_s": [("0", "0"), ("inf", "inf")],
    "janitor_batch": [("0", "0"), ("many", "many")],
}


@dataclass(frozen=True)
class Case:
    """One command under one environment; what its single error line must contain."""

    name: str
    command: str
    env: dict[str, str]
    must_show: tuple[str, ...]
    timed: bool = False  # run through TIMED_MAIN and hold the command to HUNG_BUDGET_S


@dataclass(frozen=True)
class Outcome:
    """What one case printed, how it exited and how long it took."""

    code: int
    out: str
    err: str
    elapsed_s: float


def free_port() -> int:
    """A TCP port nothing listens on (bound, then closed: connections are refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture(scope="module")
def hung_port() -> Iterator[int]:
    """A TCP server that accepts every connection and never answers (nor closes it)."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def settings_cases() -> list[Case]:
    """Every bad value of every setting, the commands taken in turn (each command gets several)."""
    commands = list(COMMANDS)
    cases = []
    for i, (field_name, values) in enumerate((f, v) for f, vs in BAD_VALUES.items() for v in vs):
        value, shown = values
        variable = f"{ENV_PREFIX}{field_name.upper()}"
        command = commands[i % len(commands)]
        cases.append(Case(f"{variable}={value!r} {command}", command, {variable: value}, (variable, shown)))
    return cases


def service_cases(refused: int, hung: int) -> list[Case]:
    """Services that refuse connections or accept and never answer, with credentials in their URLs."""
    pg = f"postgresql+psycopg://u:{SECRET}@127.0.0.1:{{port}}/db"
    rd = f"redis://:{SECRET}@127.0.0.1:{{port}}/0"
    s3 = "http://127.0.0.1:{port}"
    cases = []
    for port, how in ((refused, "refused"), (hung, "hung")):
        db = {"IPAB_DATABASE_URL": pg.format(port=port)}
        for command in ("batches", "status", "results", "cancel", "submit"):
            must_show = ("IPAB_DATABASE_URL", "u:***@127.0.0.1")
            cases.append(Case(f"database {how} {command}", command, db, must_show, timed=True))
        redis_env = {"IPAB_REDIS_URL": rd.format(port=port)}
        for command in ("reconcile", "retry", "cache"):
            must_show = ("IPAB_REDIS_URL", ":***@127.0.0.1")
            cases.append(Case(f"redis {how} {command}", command, redis_env, must_show, timed=True))
        s3_env = {"IPAB_S3_ENDPOINT_URL": s3.format(port=port)}
        must_show = ("IPAB_S3_ENDPOINT_URL", f"127.0.0.1:{port}")
        cases.append(Case(f"s3 {how} submit", "submit", s3_env, must_show, timed=True))
    return cases


def _prepare(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "rows.jsonl").write_text('{"reference": "a.png", "prompt": "p"}\n')


def _env_of(case: Case, base: Mapping[str, str]) -> dict[str, str]:
    """`base` without any `IPAB_*` variable, plus the case's."""
    return {**{k: v for k, v in base.items() if not k.startswith(ENV_PREFIX)}, **case.env}


def run_case(case: Case, folder: Path, base_env: Mapping[str, str]) -> Outcome:
    """`ipab <command>` in a subprocess in `folder` with only the case's `IPAB_*` variables."""
    _prepare(folder)
    env = _env_of(case, base_env)
    entry = ["-c", TIMED_MAIN] if case.timed else ["-m", "ipab.cli"]
    done = subprocess.run(
        [sys.executable, *entry, *COMMANDS[case.command]],
        env=env,
        cwd=folder,
        capture_output=True,
        text=True,
        timeout=HUNG_BUDGET_S + 120,  # start-up on a loaded machine; the budget is checked below
    )
    elapsed = folder / "elapsed_s"
    return Outcome(done.returncode, done.stdout, done.stderr, float(elapsed.read_text()) if elapsed.exists() else 0.0)


def run_case_in_process(case: Case, folder: Path) -> Outcome:
    """`ipab.cli.main` of the case's command in this process, with the case's environment, in
    `folder`, its output captured and its own root log handler (as in a fresh process); all put
    back afterwards. Not thread-safe (the environment and folder are the process's)."""
    from ipab import cli

    _prepare(folder)
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    out, err = io.StringIO(), io.StringIO()
    try:
        os.environ.clear()
        os.environ.update(_env_of(case, saved_env))
        os.chdir(folder)
        root.handlers = []  # so that the command's logging goes to its stderr, as in a process of its own
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(list(COMMANDS[case.command]))
            except SystemExit as e:  # argparse, and commands that exit
                code = e.code if isinstance(e.code, int) else 1
    finally:
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        root.handlers, root.level = saved_handlers, saved_level
    return Outcome(code, out.getvalue(), err.getvalue(), 0.0)


def in_subprocess(cases: list[Case]) -> list[bool]:
    """Which cases run as a subprocess: the timed, the worker's, and the first of each command."""
    seen: set[str] = set()
    chosen = []
    for case in cases:
        chosen.append(case.timed or case.command == "worker" or case.command not in seen)
        seen.add(case.command)
    return chosen


def problems_of(case: Case, outcome: Outcome) -> list[str]:
    """Why the outcome is not one clear line (empty: it is)."""
    lines = outcome.err.strip().splitlines()
    found = []
    if outcome.code != 2:
        found.append(f"exit {outcome.code}")
    if len(lines) != 1:
        found.append(f"{len(lines)} lines on stderr")
    text = outcome.err + outcome.out
    found += [f"does not show {s!r}" for s in case.must_show if s not in text]
    if SECRET in text:
        found.append("prints the password")
    if not any(word in outcome.err for word in FIX_WORDS):
        found.append("says no fix")
    if outcome.elapsed_s > HUNG_BUDGET_S:
        found.append(f"took {outcome.elapsed_s:.1f} s")
    return found


def run_table(cases: list[Case], tmp_path: Path) -> None:
    """Run every case (subprocesses in parallel, the others in process meanwhile); fail once,
    listing every case that went wrong."""
    base_env = dict(os.environ)  # read once: the in-process cases change os.environ meanwhile
    where = in_subprocess(cases)
    outcomes: list[Outcome | None] = [None] * len(cases)
    with ThreadPoolExecutor(max_workers=6) as pool:
        futures = {
            i: pool.submit(run_case, case, tmp_path / f"c{i}", base_env) for i, case in enumerate(cases) if where[i]
        }
        for i, case in enumerate(cases):
            if not where[i]:
                outcomes[i] = run_case_in_process(case, tmp_path / f"c{i}")
        for i, future in futures.items():
            outcomes[i] = future.result()
    failures = []
    for case, outcome in zip(cases, outcomes, strict=True):
        assert outcome is not None
        problems = problems_of(case, outcome)
        if problems:
            failures.append(f"{case.name}: {', '.join(problems)}\n    stderr: {outcome.err.strip()[-600:]}")
    assert not failures, f"{len(failures)} of {len(cases)} cases:\n" + "\n".join(failures)


def test_every_setting_has_a_row() -> None:
    assert sorted(set(Settings.model_fields) - set(BAD_VALUES)) == []


def test_every_command_is_in_the_table() -> None:
    assert {case.command for case in settings_cases()} == set(COMMANDS)


def test_every_bad_setting_stops_every_command_with_one_line(tmp_path: Path) -> None:
    run_table(settings_cases(), tmp_path)


def test_refused_and_hung_services_give_one_masked_line_in_bounded_time(tmp_path: Path, hung_port: int) -> None:
    run_table(service_cases(free_port(), hung_port), tmp_path)


@pytest.mark.parametrize("value", ["/tmp", "/tmp,/var", "/tmp:/var", '["/tmp", "/var"]'])
def test_reference_roots_take_a_path_or_a_list(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from shared.settings import load_settings

    monkeypatch.setenv("IPAB_REFERENCE_ROOTS", value)
    assert load_settings().reference_roots[0] == Path("/tmp")
