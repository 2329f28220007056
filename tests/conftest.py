"""Fixtures shared by every test: private Redis and S3 servers, databases, and test settings.

Every test gets its own Redis database number, its own bucket, its own SQL database and its
own Redis key prefix, so tests never see each other's data (nor anybody else's). Services
that only need to exist are shared by the session; tests that stop or restart a service
use the `private_*` fixtures so the shared ones stay up.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from devkit import services
from shared.db import make_engine, make_session_factory, upgrade_database
from shared.jobs import JobResult
from shared.settings import ENV_PREFIX, Settings
from shared.storage import ObjectStore

REPO = Path(__file__).resolve().parents[1]
POSTGRES_ADMIN_URL = services.POSTGRES_ADMIN_URL
REDIS_DATABASES = 4096  # start_redis configures this many
TEST_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "ipab-test",
    "AWS_SECRET_ACCESS_KEY": "ipab-test-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


def pytest_configure(config: pytest.Config) -> None:
    """Make the session hermetic: no stray `IPAB_*` settings, dummy AWS keys, no model hub."""
    for name in [n for n in os.environ if n.startswith(ENV_PREFIX)]:
        del os.environ[name]
    for name, value in TEST_AWS_ENV.items():
        os.environ.setdefault(name, value)
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def in_ci() -> bool:
    """Whether this run is CI, where a missing service fails the test instead of skipping it."""
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def unique_name(prefix: str) -> str:
    """A short name nobody else uses: `prefix` + 12 hex digits (valid for buckets and databases)."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


# --- Redis -------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.Service]:
    """A private redis-server for the whole session, on a free port, without persistence."""
    service = services.start_redis(workdir=tmp_path_factory.mktemp("redis"))
    yield service
    service.stop()


_redis_db_numbers = itertools.count(1)


@pytest.fixture
def redis_url(redis_server: services.Service) -> Iterator[str]:
    """URL of a database of the session's Redis that no other test uses; emptied before and after."""
    import redis

    db = next(_redis_db_numbers) % REDIS_DATABASES or 1
    url = redis_server.url.rsplit("/", 1)[0] + f"/{db}"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    if redis_server.running():
        client.flushdb()
    client.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[services.Service]:
    """A redis-server of this test alone, for tests that stop, restart or FLUSHALL it."""
    service = services.start_redis(workdir=tmp_path / "redis")
    yield service
    service.stop()


# --- S3 ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[services.Service]:
    """A private SeaweedFS (S3 API) for the whole session; `url` is its S3 endpoint."""
    service = services.start_seaweedfs(workdir=tmp_path_factory.mktemp("seaweedfs"))
    yield service
    service.stop()


@pytest.fixture
def object_store(s3_server: services.Service) -> ObjectStore:
    """An ObjectStore on a fresh bucket of the session's S3 server (created)."""
    store = ObjectStore(endpoint_url=s3_server.url, bucket=unique_name("t-"), region="us-east-1")
    store.ensure_bucket()
    return store


@pytest.fixture
def private_s3(tmp_path: Path) -> Iterator[services.Service]:
    """A SeaweedFS of this test alone, for tests that stop or restart it."""
    service = services.start_seaweedfs(workdir=tmp_path / "seaweedfs")
    yield service
    service.stop()


# --- SQL ---------------------------------------------------------------------------------------------


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLAlchemy URL of a new SQLite file in the test's folder."""
    return f"sqlite:///{tmp_path / 'ipab.db'}"


def require_postgres() -> None:
    """Skip the test without PostgreSQL at 127.0.0.1:5432; in CI (env `CI` set) fail instead."""
    if services.postgres_reachable(POSTGRES_ADMIN_URL):
        return
    message = f"PostgreSQL required in CI: nothing answers at {POSTGRES_ADMIN_URL}"
    if in_ci():
        pytest.fail(message)
    pytest.skip(f"no PostgreSQL at {POSTGRES_ADMIN_URL} (set CI=1 to make this a failure)")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A SQLAlchemy URL of a new, uniquely named database on 127.0.0.1:5432; dropped afterwards."""
    import psycopg

    require_postgres()
    name = unique_name("ipab_test_")
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    yield f"postgresql+psycopg://postgres@127.0.0.1:5432/{name}"
    with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest) -> str:
    """Runs the test twice: on a SQLite file and on a fresh PostgreSQL database."""
    url: str = request.getfixturevalue(f"{request.param}_url")
    return url


@pytest.fixture
def sessions(database_url: str) -> Iterator[sessionmaker[Session]]:
    """Sessions on `database_url`, migrated to the newest schema (a test module may narrow `database_url`)."""
    upgrade_database(database_url)
    engine = make_engine(database_url)
    yield make_session_factory(engine)
    engine.dispose()


def migrate(engine: Engine, url: str, target: str, *, down: bool = False) -> None:
    """Bring the database at `url` up (or `down`) to the alembic revision `target`, in one transaction."""
    from alembic import command

    from shared.db import alembic_config

    with engine.begin() as conn:
        config = alembic_config(url)
        config.attributes["connection"] = conn
        (command.downgrade if down else command.upgrade)(config, target)


# --- Settings ----------------------------------------------------------------------------------------


def metered_result(gpu_s: float, *, steps: int = 4, pixels: int = 64 * 64) -> JobResult:
    """What a worker's finish reports for one job of `gpu_s` device seconds and `steps` steps of `pixels`."""
    return JobResult(
        output_key="k",
        output_sha256="0" * 64,
        output_bytes=1,
        encode_s=0.0,
        denoise_s=gpu_s,
        upload_s=0.0,
        gpu_s=gpu_s,
        steps_run=steps,
        pixel_steps=pixels * steps,
    )


@pytest.fixture
def settings(redis_url: str, s3_server: services.Service, object_store: ObjectStore, sqlite_url: str) -> Settings:
    """Settings for one test: its Redis db and key prefix, its bucket, its SQLite file, short timings."""
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        database_url=sqlite_url,
        redis_url=redis_url,
        redis_prefix=unique_name("t") + ":",
        s3_endpoint_url=s3_server.url,
        s3_bucket=object_store.bucket,
        s3_region=object_store.region,
        # Short enough for tests to see leases expire; still ordered as Settings demands.
        lease_s=6.0,
        heartbeat_s=1.0,
        reconcile_interval_s=1.0,
        consumer_stall_s=6.0,
        requeue_grace_s=1.0,
        soft_time_limit_s=60.0,
        hard_time_limit_s=90.0,
        visibility_timeout_s=120.0,
        retry_base_s=0.5,
        retry_max_s=8.0,
        transient_retries=10,  # at least 27 s of retries: outlasts the 20 s S3 outage test
    )


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | dict):
        # pydantic-settings reads complex fields as JSON.
        return json.dumps(value, default=str)
    return str(value)


def settings_env(settings: Settings) -> dict[str, str]:
    """`IPAB_*` variables (plus dummy AWS keys) that make a subprocess load exactly these settings.

    Merge it over `os.environ` for `ipab worker` / `ipab submit` subprocesses. Fields that are
    None are left out (their default is None).
    """
    env = dict(TEST_AWS_ENV)
    for name, value in settings.model_dump().items():
        if value is not None:
            env[f"{ENV_PREFIX}{name.upper()}"] = _env_value(value)
    return env


@pytest.fixture(name="settings_env")
def settings_env_fixture() -> Callable[[Settings], dict[str, str]]:
    """The `settings_env(settings) -> dict[str, str]` helper, as a fixture."""
    return settings_env


@pytest.fixture
def private_postgres() -> Iterator[services.Service]:
    """A PostgreSQL server of this test alone (its own port and folder), for tests that restart it."""
    import shutil
    import tempfile

    # Not under tmp_path: when run as root the server runs as `postgres`, which cannot enter it.
    workdir = Path(tempfile.mkdtemp(prefix="ipab-pg-"))
    try:
        service = services.start_private_postgres(workdir=workdir)
    except services.ServiceError as e:
        shutil.rmtree(workdir, ignore_errors=True)
        if in_ci():
            raise
        pytest.skip(f"cannot start a private PostgreSQL: {e}")
    yield service
    service.stop()
    shutil.rmtree(workdir, ignore_errors=True)


# --- A host without the GPU stack ---------------------------------------------------------------------

GPU_STACK = ("torch", "diffusers", "transformers", "accelerate", "safetensors")

# Run `ipab` with an import hook that makes the GPU stack unimportable, as on a host without it.
NO_GPU_STACK = f"""
import sys

class _NoGpuStack:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {GPU_STACK!r}:
            raise ImportError(f"{{name}} is not installed here (blocked by the test)")
        return None

sys.meta_path.insert(0, _NoGpuStack())
from ipab.cli import main
code = main(sys.argv[1:])
assert not any(m.split(".")[0] in {GPU_STACK!r} for m in sys.modules), "a GPU module was imported"
sys.exit(code)
"""


@pytest.fixture
def ipab_without_gpu_stack(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """`run(env, *argv)`: `ipab ARGV` in a subprocess with `env` (the repository on PYTHONPATH), in the test's
    folder, where importing torch, diffusers, transformers, accelerate or safetensors raises."""
    script = tmp_path / "ipab_without_gpu_stack.py"
    script.write_text(NO_GPU_STACK)

    def run(env: dict[str, str], *argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(script), *argv],
            env=env | {"PYTHONPATH": str(REPO)},
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=120,
        )

    return run


# --- A loopback-only network namespace ----------------------------------------------------------------


@pytest.fixture(scope="session")
def run_isolated() -> Callable[..., dict[str, Any]]:
    """`run_isolated(module, *args, timeout_s=...)`: `module.main(args)` run in a network namespace that
    has loopback only, with a DNS server that never answers; its result.

    Tests of DNS, address filtering and SSRF must never send a packet past loopback. The namespace
    is `devkit.netns`'s (the benchmarks use it too): `lo` up and checked to be the only interface,
    a resolv.conf naming 127.0.0.1 bind-mounted over /etc/resolv.conf, and a UDP socket on
    127.0.0.1:53 that answers no query. A machine that refuses namespaces skips the test; a
    scenario that fails fails it.
    """
    from devkit import netns

    def run(module: str, *args: str, timeout_s: float) -> dict[str, Any]:
        try:
            return netns.run_isolated(module, *args, timeout_s=timeout_s)
        except netns.NamespaceRefused as e:
            pytest.skip(f"cannot create a network namespace here: {e}")
        except RuntimeError as e:
            pytest.fail(str(e))

    return run
