"""What every benchmark needs: private services, settings for subprocesses, workers, waiting, machine facts.

Each benchmark starts its own Redis and SeaweedFS in a temporary folder and its own SQL
database (a SQLite file, or a fresh `ipab_bench_<hex>` database on the PostgreSQL at
127.0.0.1:5432), and stops or drops them when it ends, so it touches nobody's data.
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Final, Literal

from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from devkit import services
from shared.db import TERMINAL, Job, JobStatus, make_engine, make_session_factory
from shared.settings import ENV_PREFIX, Settings
from shared.storage import ObjectStore

REPO: Final = Path(__file__).resolve().parents[1]
BENCH_BUCKET: Final = "ipab-bench"
BENCH_AWS_ENV: Final = {
    "AWS_ACCESS_KEY_ID": "ipab-bench",
    "AWS_SECRET_ACCESS_KEY": "ipab-bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
Database = Literal["sqlite", "postgres"]


def log(message: str) -> None:
    """Progress on stderr, so stdout stays the summary."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_info() -> dict[str, Any]:
    """CPU model, cores, OS and versions: what the figures were measured on."""
    model = platform.processor() or "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    import celery
    import sqlalchemy

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "celery": celery.__version__,
        "sqlalchemy": sqlalchemy.__version__,
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "load_average_1m_at_start": round(os.getloadavg()[0], 2),
    }


def postgres_available() -> bool:
    """Whether the PostgreSQL at 127.0.0.1:5432 accepts connections."""
    return services.postgres_reachable(services.POSTGRES_ADMIN_URL)


@contextlib.contextmanager
def private_database(kind: Database, workdir: Path) -> Iterator[str]:
    """A SQLAlchemy URL of an empty database of this benchmark alone; dropped (or deleted) afterwards."""
    if kind == "sqlite":
        path = workdir / f"ipab-bench-{uuid.uuid4().hex[:8]}.db"
        try:
            yield f"sqlite:///{path}"
        finally:
            for leftover in workdir.glob(f"{path.name}*"):  # the database, its WAL and lock files
                leftover.unlink()
        return
    import psycopg

    name = f"ipab_bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(services.POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(services.POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Services:
    """A private Redis and SeaweedFS (S3), in one temporary folder."""

    redis: services.Service
    s3: services.Service
    workdir: Path


@contextlib.contextmanager
def private_services() -> Iterator[Services]:
    """Start Redis and SeaweedFS on free loopback ports; stop them and delete their folder at the end.

    The bench's own AWS keys replace any set here (a user's, a test's): the workers it starts
    get them from `settings_env`, and this process must sign its S3 calls the same way.
    """
    os.environ.update(BENCH_AWS_ENV)
    workdir = Path(tempfile.mkdtemp(prefix="ipab-bench-"))
    started: list[services.Service] = []
    try:
        started.append(services.start_redis(workdir=workdir / "redis"))
        started.append(services.start_seaweedfs(workdir=workdir / "s3"))
        yield Services(redis=started[0], s3=started[1], workdir=workdir)
    finally:
        for service in reversed(started):
            service.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def bench_settings(svc: Services, database_url: str, **overrides: Any) -> Settings:
    """Settings on the private services, a fresh bucket and key prefix; the bucket is created."""
    tag = uuid.uuid4().hex[:8]
    settings = Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=database_url,
        redis_url=svc.redis.url,
        redis_prefix=f"bench{tag}:",
        s3_endpoint_url=svc.s3.url,
        s3_bucket=f"{BENCH_BUCKET}-{tag}",
        reference_roots=[svc.workdir],
        **overrides,
    )
    ObjectStore.from_settings(settings).ensure_bucket()
    return settings


def settings_env(settings: Settings, **extra: str) -> dict[str, str]:
    """`os.environ` without stray `IPAB_*`, plus the variables that make a subprocess load `settings`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(BENCH_AWS_ENV)
    for name, value in settings.model_dump().items():
        if value is None:
            continue
        text = ("true" if value else "false") if isinstance(value, bool) else value
        if isinstance(value, list | dict):
            text = json.dumps(value, default=str)
        env[f"{ENV_PREFIX}{name.upper()}"] = str(text)
    env.update({"PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **extra})
    return env


def free_port() -> int:
    """A loopback TCP port nothing listens on now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_api(settings: Settings, log_path: Path, **extra_env: str) -> tuple[subprocess.Popen[bytes], str]:
    """An `ipab api` process on `settings` and a free port, once its /readyz answers: (process, base URL)."""
    import httpx

    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "ipab.cli", "api", "--port", str(port)],
        env=settings_env(settings, **extra_env),
        stdout=log_path.open("wb"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.2)
    raise RuntimeError(f"ipab api did not start: {log_tail(log_path)}")


def log_tail(path: Path, chars: int = 3000) -> str:
    """The end of a log file, for error messages."""
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def start_worker(env: dict[str, str], log_path: Path, *, module: str = "ipab.cli") -> subprocess.Popen[bytes]:
    """`python -m <module> worker` in its own process group (so a stop takes its pool child too)."""
    # An explicit node name: each worker's must differ, and Celery refuses `%p` in one.
    node = f"bench-{log_path.stem}-{uuid.uuid4().hex[:6]}@{platform.node()}"
    with log_path.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-m", module, "worker", "--loglevel", "WARNING", "--name", node],
            env=env,
            cwd=REPO,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def stop_workers(procs: Sequence[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each worker's process group, SIGKILL whatever is left after a few seconds."""
    for proc in procs:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for proc in procs:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def sessions_for(settings: Settings) -> sessionmaker[Session]:
    """A session factory on the benchmark's database."""
    return make_session_factory(make_engine(settings.database_url))


def status_counts(sessions: sessionmaker[Session], batch_id: str) -> dict[str, int]:
    """How many jobs of the batch are in each status."""
    with sessions() as session:
        rows = session.execute(
            select(Job.status, func.count()).where(Job.batch_id == batch_id).group_by(Job.status)
        ).all()
    return {status: count for status, count in rows}


def wait_for_batch(
    sessions: sessionmaker[Session],
    batch_id: str,
    *,
    timeout_s: float,
    procs: Sequence[subprocess.Popen[bytes]] = (),
    poll_s: float = 0.25,
) -> dict[str, int]:
    """Block until every job of the batch is terminal; return the counts. Raises if workers die or time runs out."""
    deadline = time.monotonic() + timeout_s
    terminal = {s.value for s in TERMINAL}
    while True:
        counts = status_counts(sessions, batch_id)
        if counts and all(status in terminal for status in counts):
            return counts
        dead = [p.pid for p in procs if p.poll() is not None]
        if dead:
            raise RuntimeError(f"worker process(es) {dead} exited; counts so far {counts}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch_id} not done after {timeout_s:.0f} s: {counts}")
        time.sleep(poll_s)


def job_rows(sessions: sessionmaker[Session], batch_id: str) -> list[Job]:
    """Every succeeded job of the batch, in the order they finished."""
    with sessions() as session:
        stmt = (
            select(Job)
            .where(Job.batch_id == batch_id, Job.status == JobStatus.succeeded.value)
            .order_by(Job.finished_at)
        )
        return list(session.scalars(stmt))


def steady_state_s_per_job(finish_times_s: Sequence[float]) -> float:
    """(last finish - first finish) / (n - 1): start-up and model load fall before the first finish."""
    if len(finish_times_s) < 2:
        raise ValueError(f"need at least 2 finished jobs for a steady-state rate, got {len(finish_times_s)}")
    ordered = sorted(finish_times_s)
    return (ordered[-1] - ordered[0]) / (len(ordered) - 1)


def write_references(folder: Path, count: int, *, size_px: int = 224) -> list[Path]:
    """`count` distinct reference photos (crops of scikit-image's photos), as PNG files."""
    from PIL import Image
    from skimage import data

    folder.mkdir(parents=True, exist_ok=True)
    photos = [getattr(data, name)() for name in ("astronaut", "coffee", "chelsea", "rocket")]
    paths = []
    for i in range(count):
        pixels = photos[i % len(photos)]
        shift = 7 * (i // len(photos))
        image = Image.fromarray(pixels[shift:, shift:]).convert("RGB").resize((size_px, size_px))
        path = folder / f"ref-{i:02d}.png"
        image.save(path)
        paths.append(path)
    return paths


def write_manifest(path: Path, references: Sequence[Path], *, rows: int, fields: dict[str, Any]) -> Path:
    """A JSONL manifest of `rows` rows cycling over `references`, with distinct prompts and seeds."""
    with path.open("w") as out:
        for i in range(rows):
            row = {"reference": str(references[i % len(references)]), "prompt": f"a photo, variation {i}", "seed": i}
            out.write(json.dumps({**row, **fields}) + "\n")
    return path


@contextlib.contextmanager
def stopwatch() -> Iterator[list[float]]:
    """`with stopwatch() as t:` ... then `t[0]` is the elapsed seconds."""
    box: list[float] = []
    t0 = time.perf_counter()
    try:
        yield box
    finally:
        box.append(time.perf_counter() - t0)


def with_bytecode(env: dict[str, str], folder: Path) -> dict[str, str]:
    """`env` in which Python reads and writes compiled bytecode (in `folder`), as an installed package
    has it: where PYTHONDONTWRITEBYTECODE is set (CI, this machine), every command would otherwise
    compile this project's modules again at each start."""
    out = {k: v for k, v in env.items() if k != "PYTHONDONTWRITEBYTECODE"}
    out["PYTHONPYCACHEPREFIX"] = str(folder)
    return out
