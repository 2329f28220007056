"""Large POST /v1/batches bodies are parsed, validated and submitted in child processes.

A batch of 99,000 rows costs about 11 s of CPU. In the API process that CPU holds the GIL,
and every request of every tenant waits for it between its own steps: measured
(bench/two_tenants.py), another tenant's GET of a job went from 11 to 39 ms (p50) beside
one. So a body of at least IPAB_API_BATCH_PROCESS_MIN_BYTES goes to one of
IPAB_API_BATCH_PROCESSES child processes (spawned, not forked: the API process has threads),
and the API process only waits for the answer on its event loop. Small bodies stay in the
API process, where they cost less than the trip.

Each child builds its own context once (SQL engine, Redis client, object store; it does not
migrate: the API process did), and runs the same `create_batch` as the API process would.
What crosses the boundary is plain data: the request (`BatchRequest`), and back the 202's
body or the problem the route answers (`ApiProblem.as_data`), so every answer is the one
the API process would have given. The body itself goes through a temporary file, written
in a thread: pickled, a 64 MiB body cost the API process 128 MiB more (the pickle's buffer
grows by doubling), and its copy held the GIL.

A child that dies (OOM-killed, SIGKILL) breaks the pool: the requests it held get 503
(`unavailable`, Retry-After; a batch is written in one transaction, so theirs were not
written unless it died in the moment after the commit) and the pool is built again for the
next ones. `ipab api` starts the processes with the API (`start`): started at the first large
batch, they cost it their start-up (imports, clients), which doubled a 10,000-row batch's time
(bench/api.py). They stop when the API does. A batch of 99,000 rows leaves a child holding
hundreds of MiB that its allocator keeps (measured: 477-809 MiB idle after the two-tenant
bench), which the API pod's memory limit counts: a pool one of whose processes holds more than
RECYCLE_RSS_BYTES after a batch is replaced after IDLE_STOP_S without a large batch (by fresh
processes at once where `start` started it, else at the next large batch).

The children run at the lowest CPU priority (SCHED_IDLE on Linux, and nice BATCH_PROCESS_NICE):
a batch of 99,000 rows keeps one busy for seconds, and on a machine with few cores the API
process, whose requests each need a few milliseconds, then waited for a core behind it
(measured, bench/two_tenants.py: another tenant's GET p99 beside the hostile tenant 2.17x of
alone at nice +10; 1.86x and 2.62x at nice 19, where a woken API thread still queued behind
the batch process's core; see BENCHMARKS.md for SCHED_IDLE). Linux counts a core that runs only
SCHED_IDLE work as idle when it places a waking thread, so a batch gets what the API leaves.

A body that cannot be written to the temporary directory (TMPDIR unwritable, or full) is a
503 that names it, not a 500.

A whole batch's cancel runs there too (`call`): a tenant's 99,000-job cancel is 99 transactions
of outbox rows and roll-ups, seconds of Python that held the API process's GIL (about 30% of its
samples beside the hostile tenant of bench/two_tenants.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import multiprocessing
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, TypeVar

from scheduler.api.problems import RETRY_AFTER_UNAVAILABLE_S, ApiProblem, known_problem
from shared.settings import Settings

if TYPE_CHECKING:
    from scheduler.api.batch_create import BatchRequest
    from scheduler.api.context import ApiContext

log = logging.getLogger(__name__)
CREATED: Final = "created"
PROBLEM: Final = "problem"
BATCH_PROCESS_NICE: Final = 19  # added to the API's nice value in each batch process (see the module)
IDLE_STOP_S: Final = 30.0  # a swollen pool (see RECYCLE_RSS_BYTES) with no batch this long is replaced
RECYCLE_RSS_BYTES: Final = 512 * 1024 * 1024  # a batch process left holding more than this is swollen

T = TypeVar("T")

# The child's context, built once by `_start_child` (a child process serves one API process).
_CHILD: list[ApiContext] = []


def _start_child(settings: Settings) -> None:
    """Build the child's context, at a lower CPU priority; Ctrl-C is the API's to handle (it stops the pool)."""
    from scheduler.api.context import ApiContext  # (context.py imports this module)

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.nice(BATCH_PROCESS_NICE)
    with contextlib.suppress(AttributeError, OSError):  # Linux: SCHED_IDLE; elsewhere the nice value alone
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    _CHILD.append(ApiContext.build(settings, migrate=False))


def _ready() -> None:
    """Nothing: one per process makes the pool start them all (`BatchProcesses.start`)."""


def _rss_bytes() -> int:
    """This process's resident memory (from /proc; 0 where there is none)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def _create_in_child(request: BatchRequest) -> tuple[str, dict[str, Any], int]:
    """(CREATED, the 202's body) or (PROBLEM, the problem as data), with the process's resident
    memory afterwards; an unexpected error is raised."""
    from scheduler.api.batch_create import create_batch  # (it imports context.py, which imports this module)

    if request.body_path is not None:
        request = dataclasses.replace(request, data=Path(request.body_path).read_bytes(), body_path=None)
    try:
        outcome, body = CREATED, create_batch(_CHILD[0], request)
    except Exception as e:
        problem = known_problem(e)
        if problem is None:
            raise
        outcome, body = PROBLEM, problem.as_data()
    return outcome, body, _rss_bytes()


def _call_in_child(fn: Callable[..., T], args: tuple[Any, ...]) -> T:
    """`fn(the child's context, *args)` (see `BatchProcesses.call`)."""
    return fn(_CHILD[0], *args)


def _spill(data: bytes | bytearray) -> str:
    """A temporary file holding `data` (written in one call: no copy); its path. OSError when the
    temporary directory takes no file or not all of it (nothing is left behind then)."""
    fd, path = tempfile.mkstemp(prefix="ipab-batch-", suffix=".jsonl")
    try:
        with os.fdopen(fd, "wb") as out:
            out.write(data)
    except BaseException:
        _remove(path)
        raise
    return path


def _remove(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def no_temporary_file() -> ApiProblem:
    """503 for a body that could not be written to the temporary directory: the operator's to fix
    (the directory and the error are in the API's log, not in the answer)."""
    detail = (
        "this server cannot write batch bodies to its temporary directory (not writable, or full): "
        "its operator must make TMPDIR writable, with room for the largest body (IPAB_API_MAX_BODY_BYTES), "
        "or handle batches in the API process (IPAB_API_BATCH_PROCESSES=0). Nothing of this batch was submitted"
    )
    headers = {"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)}
    return ApiProblem(503, detail, headers=headers, kind="unavailable")


def died(processes: int) -> ApiProblem:
    """503 for the requests of a batch process that died (their batches were almost surely not written)."""
    detail = (
        f"the batch process handling this batch (IPAB_API_BATCH_PROCESSES={processes}) stopped before answering "
        "(out of memory, or killed): send the batch again. A batch is written in one transaction: unless "
        "GET /v1/batches shows it, nothing of it was submitted"
    )
    headers = {"Retry-After": str(RETRY_AFTER_UNAVAILABLE_S)}
    return ApiProblem(503, detail, headers=headers, kind="unavailable")


class BatchProcesses:
    """The API process's pool of batch processes, started at the first large batch (event loop only)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.processes = settings.api_batch_processes
        self._pool: ProcessPoolExecutor | None = None
        self._in_flight = 0  # batches sent to the pool and not answered yet
        self._busy = 0  # batches and calls sent to the pool and not answered yet (any thread: under _busy_lock)
        self._busy_lock = threading.Lock()
        self._idle: asyncio.TimerHandle | None = None  # replaces a swollen pool once IDLE_STOP_S pass with none
        self._swollen = False  # a process of the pool holds more than RECYCLE_RSS_BYTES
        self._started = False  # `start` was called: a replaced pool is started at once too

    def start(self) -> None:
        """Start the processes now (`ipab api`), so that the first large batch does not wait for them."""
        if self.processes <= 0:
            return
        self._started = True
        pool = self._current()
        for _ in range(self.processes):
            pool.submit(_ready)

    def takes(self, size_bytes: int) -> bool:
        """Whether a body of `size_bytes` goes to a batch process (else it is handled in the API's)."""
        return self.processes > 0 and size_bytes >= self.settings.api_batch_process_min_bytes

    def _current(self) -> ProcessPoolExecutor:
        if self._pool is None:
            self._pool = ProcessPoolExecutor(
                max_workers=self.processes,
                mp_context=multiprocessing.get_context("spawn"),
                initializer=_start_child,
                initargs=(self.settings,),
            )
        return self._pool

    def _discard(self, pool: ProcessPoolExecutor) -> None:
        """Drop a broken pool (once, whichever of its requests sees it first); the next call builds another."""
        if self._pool is pool:
            self._pool, self._swollen = None, False
            log.warning("a batch process died; starting new ones for the next batches")
        pool.shutdown(wait=False, cancel_futures=True)

    async def create(self, request: BatchRequest) -> dict[str, Any]:
        """`create_batch` in a batch process: the 202's body; its ApiProblem, or 503 if the process died."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        self._in_flight += 1
        self._count_busy(+1)
        try:
            return await self._create(request)
        finally:
            self._count_busy(-1)
            self._in_flight -= 1
            if self._in_flight == 0 and self._swollen and self._pool is not None:
                self._idle = asyncio.get_running_loop().call_later(IDLE_STOP_S, self._replace_idle)

    def _replace_idle(self) -> None:
        """Stop an idle swollen pool, so its processes give their memory back; start another if `start`ed."""
        self._idle = None
        if self._in_flight == 0 and self._pool is not None:
            pool, self._pool, self._swollen = self._pool, None, False
            pool.shutdown(wait=False)
            if self._started:
                self.start()

    async def _create(self, request: BatchRequest) -> dict[str, Any]:
        try:
            path = await asyncio.to_thread(_spill, request.data)
        except OSError as e:
            log.error("cannot write a batch body to the temporary directory %s (TMPDIR): %s", tempfile.gettempdir(), e)
            raise no_temporary_file() from None
        try:
            pool, future = self._submit(dataclasses.replace(request, data=b"", body_path=path))
        except BaseException:
            _remove(path)
            raise
        future.add_done_callback(lambda _: _remove(path))  # answered, failed or canceled: read by then, or never
        try:
            outcome, body, rss_bytes = await asyncio.wrap_future(future)
        except BrokenProcessPool:
            self._discard(pool)
            raise died(self.processes) from None
        self._swollen = self._swollen or rss_bytes > RECYCLE_RSS_BYTES
        if outcome == PROBLEM:
            raise ApiProblem.from_data(body)
        return body

    def _submit(self, request: BatchRequest) -> tuple[ProcessPoolExecutor, Future[tuple[str, dict[str, Any], int]]]:
        pool = self._current()
        try:
            return pool, pool.submit(_create_in_child, request)
        except BrokenProcessPool:  # it broke between batches: this request lost nothing, try a new pool
            self._discard(pool)
            pool = self._current()
            return pool, pool.submit(_create_in_child, request)

    def call(self, ctx: ApiContext, fn: Callable[..., T], *args: Any) -> T:
        """`fn(context, *args)` in a batch process, waited for in the calling thread (not the event
        loop's): for one tenant's work that would hold this process's GIL for seconds.

        In the calling thread, on `ctx`, where no pool was started (IPAB_API_BATCH_PROCESSES=0, or an
        app not run by `ipab api`), it is broken or being replaced, or every process is busy: a call
        never waits in the pool's queue behind another tenant's batch of 99,000 rows. `fn` is a
        module-level function and `args` plain data (they are pickled); 503 when the process died
        before answering: `fn` must be safe to run again (a cancel converges).
        """
        pool = self._pool if self._started else None
        if pool is None or not self._count_busy(+1, below=self.processes):
            return fn(ctx, *args)  # no pool, or every process busy: not queued behind another tenant's batch
        try:
            try:
                future = pool.submit(_call_in_child, fn, args)
            except (BrokenProcessPool, RuntimeError):  # broken earlier (the next batch replaces it), or just replaced
                return fn(ctx, *args)
            try:
                return future.result()
            except BrokenProcessPool:
                raise died(self.processes) from None
        finally:
            self._count_busy(-1)

    def _count_busy(self, change: int, *, below: int | None = None) -> bool:
        """Add `change` to the work in the pool, unless that would pass `below`; whether it was added."""
        with self._busy_lock:
            if below is not None and self._busy + change > below:
                return False
            self._busy += change
            return True

    def close(self) -> None:
        """Stop the processes (a batch in progress is left to finish first)."""
        if self._idle is not None:
            self._idle.cancel()
            self._idle = None
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
