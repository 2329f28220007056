"""CLI start-up: `ipab --help`, `ipab status BATCH` and `ipab batches` against `celery --help`, in one run.

What every `ipab status` in a loop, every script and every CI step pays before the command
does anything. Each command is a fresh process, started as a user starts it (the console
scripts beside this Python); the four run interleaved, one of each and again, REPETITIONS
times after one warm-up round, so that a change in the machine's load touches all of them
alike. Reported: each command's median wall time and its ratio to `celery --help`'s median
(the goals), and the median CPU time (user + system) with its ratio: on a busy machine the
wall times stretch with the load, the CPU times much less.

`ipab status` and `ipab batches` read a real batch of JOBS finished jobs in a SQLite file
made for the run; no Redis or S3 is needed (a batch with no queued job has no forecast).

Bytecode: each command reads its modules' compiled bytecode, as an installed package does (pip
compiles it at install; an editable install writes it at the first run). The children run with
PYTHONPYCACHEPREFIX in the run's folder and without PYTHONDONTWRITEBYTECODE, so the warm-up round
writes the cache for every command alike and the work tree gets no `__pycache__`. With
`--no-bytecode`, every run compiles the modules it does not find compiled (this project's, under
PYTHONDONTWRITEBYTECODE=1): the ratio then counts compiling ipab's source, not starting it.

Run alone: `python -m bench.startup [--repetitions 15] [--no-bytecode]`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Final

from bench.common import with_bytecode

BATCH: Final = "startup-bench"
JOBS: Final = 200
BASELINE: Final = "celery --help"
# Each command's argv after its console script, and the most it may take against the baseline.
COMMANDS: Final[dict[str, tuple[str, ...]]] = {
    BASELINE: ("celery", "--help"),
    "ipab --help": ("ipab", "--help"),
    "ipab status BATCH": ("ipab", "status", BATCH),
    "ipab batches": ("ipab", "batches"),
}
GOALS: Final = {"ipab --help": 1.0, "ipab status BATCH": 1.6, "ipab batches": 1.6}


def _script(name: str) -> str:
    """The console script `name` of this Python's environment."""
    path = Path(sys.executable).with_name(name)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: install ipab in this environment (make venv)")
    return str(path)


def _write_batch(database_url: str) -> None:
    """A batch of JOBS succeeded jobs, written with the schema's own API."""
    from shared.db import Batch, Job, JobStatus, ensure_database, make_engine, make_session_factory, utcnow

    ensure_database(database_url)
    engine = make_engine(database_url)
    try:
        with make_session_factory(engine).begin() as session:
            batch = Batch(name=BATCH, model_set="bench-startup", job_count=JOBS)
            session.add(batch)
            session.flush()
            now = utcnow()
            session.add_all(
                Job(
                    batch_id=batch.id,
                    line=line,
                    dedupe_key=f"{line:064x}",
                    spec="{}",
                    seed=line,
                    status=JobStatus.succeeded.value,
                    finished_at=now,
                    encode_s=0.01,
                    denoise_s=0.5,
                    upload_s=0.02,
                )
                for line in range(1, JOBS + 1)
            )
    finally:
        engine.dispose()


def _cpu_s() -> float:
    """User and system seconds of this process's finished children so far."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _time_once(argv: list[str], env: dict[str, str], cwd: Path) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of one run of `argv`."""
    cpu_before_s, t0 = _cpu_s(), time.perf_counter()
    done = subprocess.run(argv, env=env, cwd=cwd, capture_output=True, text=True, timeout=120)
    elapsed_s, cpu_s = time.perf_counter() - t0, _cpu_s() - cpu_before_s
    if done.returncode != 0:
        raise RuntimeError(f"`{' '.join(argv)}` exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return elapsed_s, cpu_s


def _measure(env: dict[str, str], cwd: Path, repetitions: int) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) seconds per run of each command, the commands interleaved; the warm-up round dropped."""
    argvs = {label: [_script(argv[0]), *argv[1:]] for label, argv in COMMANDS.items()}
    runs: dict[str, list[tuple[float, float]]] = {label: [] for label in COMMANDS}
    for round_number in range(repetitions + 1):
        for label, argv in argvs.items():
            timed = _time_once(argv, env, cwd)
            if round_number:
                runs[label].append(timed)
    return runs


def _environment(workdir: Path, database_url: str, *, bytecode: bool) -> dict[str, str]:
    """The commands' environment: no IPAB_* but the database; with `bytecode`, a bytecode cache in `workdir`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPAB_")}
    env["IPAB_DATABASE_URL"] = database_url
    return with_bytecode(env, workdir / "pycache") if bytecode else env


def run(*, repetitions: int = 15, bytecode: bool = True) -> dict[str, Any]:
    """Median seconds of each command and its ratio to `celery --help`, measured in this one run."""
    with tempfile.TemporaryDirectory(prefix="ipab-startup-") as folder:
        workdir = Path(folder)
        database_url = f"sqlite:///{workdir / 'startup.db'}"
        _write_batch(database_url)
        runs = _measure(_environment(workdir, database_url, bytecode=bytecode), workdir, repetitions)
    walls = {label: [wall for wall, _ in timed] for label, timed in runs.items()}
    cpus = {label: statistics.median(cpu for _, cpu in timed) for label, timed in runs.items()}
    medians = {label: statistics.median(seconds) for label, seconds in walls.items()}
    commands = {
        label: {
            "median_s": medians[label],
            "min_s": min(walls[label]),
            "over_baseline": medians[label] / medians[BASELINE],
            "cpu_s": cpus[label],
            "cpu_over_baseline": cpus[label] / cpus[BASELINE],
            "goal": GOALS.get(label),
        }
        for label in COMMANDS
    }
    return {"repetitions": repetitions, "jobs": JOBS, "bytecode": bytecode, "baseline": BASELINE, "commands": commands}


def to_markdown(figures: dict[str, Any]) -> str:
    """The section's table for BENCHMARKS.md."""
    lines = [
        f"Each command a fresh process, the four interleaved, {figures['repetitions']} runs each after a warm-up "
        f"round; `ipab status` and `ipab batches` on a SQLite batch of {figures['jobs']} jobs; "
        + ("modules read from their compiled bytecode." if figures["bytecode"] else "no bytecode cache written."),
        "",
        f"| command | median ms | fastest ms | / {BASELINE} | goal | CPU ms | CPU / {BASELINE} |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]
    for label, c in figures["commands"].items():
        goal = "" if c["goal"] is None else f"<= {c['goal']:.1f}x"
        wall = f"{1000 * c['median_s']:.0f} | {1000 * c['min_s']:.0f} | {c['over_baseline']:.2f}x | {goal}"
        lines.append(f"| `{label}` | {wall} | {1000 * c['cpu_s']:.0f} | {c['cpu_over_baseline']:.2f}x |")
    return "\n".join(lines)


def main() -> None:
    """Command line: print the figures as JSON, then the table."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repetitions", type=int, default=15, help="timed runs of each command")
    parser.add_argument("--no-bytecode", action="store_true", help="write no bytecode cache (see above)")
    args = parser.parse_args()
    figures = run(repetitions=args.repetitions, bytecode=not args.no_bytecode)
    print(json.dumps(figures, indent=2))
    print(to_markdown(figures))


if __name__ == "__main__":
    main()
