"""Large batches are handled in batch processes (scheduler/api/batch_processes.py): every answer is the
one the API process gives itself, and a batch process that dies costs its request a 503, not the API."""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import re
import signal
import threading
import time
from collections.abc import Iterator
from typing import Any, Final

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

import scheduler.api.batch_processes as batch_processes
from scheduler.api.app import create_app
from shared.db import Job, make_engine, make_session_factory
from shared.errors import NotFound
from shared.job_status import JobStatus
from shared.settings import Settings
from tests.scheduler.api.conftest import JOB, assert_problem, job_count, upload

JSONL: Final = {"content-type": "application/jsonl"}
CHILD_START_S: Final = 60.0  # a spawned batch process imports the API's modules: seconds on a loaded machine


def rows_body(ref: str, rows: int, **fields: Any) -> str:
    return "\n".join(json.dumps({**JOB, "references": [ref], "seed": i, **fields}) for i in range(rows)) + "\n"


@pytest.fixture(autouse=True)
def no_children_left() -> None:
    """Each test counts its own batch processes: an earlier test's, shut down without waiting, end first."""
    for child in multiprocessing.active_children():
        child.join(timeout=CHILD_START_S)


@pytest.fixture
def in_children(api_settings: Settings) -> Settings:
    """Every batch goes to one batch process."""
    return api_settings.model_copy(update={"api_batch_processes": 1, "api_batch_process_min_bytes": 0})


@pytest.fixture
def child_client(in_children: Settings) -> Iterator[TestClient]:
    with TestClient(create_app(in_children, dispatcher=False), raise_server_exceptions=False) as c:
        yield c


def _answers(client: TestClient, headers: dict[str, str], ref: str) -> list[tuple[int, Any, str | None]]:
    """(status, body less the batch id, Retry-After) of a 202, a 422 of invalid rows, a 413, a 429 queue-full."""
    bodies = [
        ("?skip_invalid=true", rows_body(ref, 3) + '{"prompt": 1}\n'),
        ("", '{"prompt": 1}\n' * 150),
        ("", rows_body(ref, 201)),  # past api_max_batch_rows
        ("", rows_body(ref, 5, lane="nowhere")),
        ("", rows_body(ref, 5)),  # past api_max_queued_jobs
    ]
    answers = []
    for query, body in bodies:
        r = client.post(f"/v1/batches{query}", headers={**headers, **JSONL}, content=body)
        answer = r.json()
        if r.status_code == 202:
            answer.pop("id")
        answers.append((r.status_code, answer, r.headers.get("retry-after")))
    return answers


def test_a_batch_process_gives_every_answer_the_api_process_gives(
    api_settings: Settings, in_children: Settings, alice: dict[str, str], bob: dict[str, str]
) -> None:
    limits = {"api_max_batch_rows": 200, "api_max_queued_jobs": 4}
    answers = []
    for settings, headers in ((api_settings, alice), (in_children, bob)):
        app = create_app(settings.model_copy(update=limits), dispatcher=False)
        with TestClient(app, raise_server_exceptions=False) as client:
            answers.append(_answers(client, headers, upload(client, headers)))
    in_process, in_child = answers
    assert [status for status, _, _ in in_child] == [202, 422, 413, 422, 429]
    assert json.dumps(in_child).replace("bob", "alice") == json.dumps(in_process)  # the tenant's name aside
    assert job_count(api_settings) == 6  # three rows each


def _post_in_thread(client: TestClient, headers: dict[str, str], body: str) -> tuple[threading.Thread, list[Any]]:
    got: list[Any] = []
    thread = threading.Thread(
        target=lambda: got.append(client.post("/v1/batches", headers={**headers, **JSONL}, content=body))
    )
    thread.start()
    return thread, got


def test_a_batch_process_killed_mid_batch_answers_503_and_the_next_batch_is_served(
    child_client: TestClient, alice: dict[str, str], api_settings: Settings
) -> None:
    ref = upload(child_client, alice)
    first = child_client.post("/v1/batches", headers={**alice, **JSONL}, content=rows_body(ref, 2))
    assert first.status_code == 202, first.text  # the batch process is up
    (child,) = multiprocessing.active_children()
    thread, got = _post_in_thread(child_client, alice, rows_body(ref, 20_000))
    time.sleep(0.5)
    os.kill(child.pid or 0, signal.SIGKILL)
    thread.join(timeout=CHILD_START_S)
    (r,) = got
    assert_problem(r, 503, "stopped before answering", "send the batch again", "IPAB_API_BATCH_PROCESSES=1")
    assert r.headers["retry-after"] == "5"
    assert child_client.get("/healthz").status_code == 200
    again = child_client.post("/v1/batches", headers={**alice, **JSONL}, content=rows_body(ref, 3))
    assert again.status_code == 202, again.text
    assert job_count(api_settings) == 5
    assert [p.pid for p in multiprocessing.active_children()] != [child.pid]


def test_small_batches_stay_in_the_api_process(api_settings: Settings, alice: dict[str, str]) -> None:
    settings = api_settings.model_copy(update={"api_batch_processes": 1, "api_batch_process_min_bytes": 1 << 20})
    with TestClient(create_app(settings, dispatcher=False), raise_server_exceptions=False) as client:
        ref = upload(client, alice)
        r = client.post("/v1/batches", headers={**alice, **JSONL}, content=rows_body(ref, 2))
        assert r.status_code == 202, r.text
        assert multiprocessing.active_children() == []


def _post(client: TestClient, headers: dict[str, str], ref: str, rows: int) -> None:
    r = client.post("/v1/batches", headers={**headers, **JSONL}, content=rows_body(ref, rows))
    assert r.status_code == 202, r.text


def test_a_batch_process_left_swollen_is_replaced_once_idle(
    in_children: Settings, alice: dict[str, str], api_settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_processes, "IDLE_STOP_S", 0.5)
    monkeypatch.setattr(batch_processes, "RECYCLE_RSS_BYTES", 0)  # every batch leaves its process swollen
    with TestClient(create_app(in_children, dispatcher=False), raise_server_exceptions=False) as client:
        ref = upload(client, alice)
        _post(client, alice, ref, 2)
        (child,) = multiprocessing.active_children()
        _until_gone(child)  # it exits by itself once idle: its memory goes back
        assert not child.is_alive()
        assert multiprocessing.active_children() == []  # started by a batch: the next batch starts others
        _post(client, alice, ref, 3)
        assert [p.pid for p in multiprocessing.active_children()] not in ([], [child.pid])
    assert job_count(api_settings) == 5


def _until_gone(child: multiprocessing.process.BaseProcess) -> None:
    """Wait for `child` to exit. One `join` is not enough: the pool's own thread joins it too, and the
    join that loses the race for its exit status returns at once, the process still counted alive
    (its `waitpid` fails with ECHILD) until the winner records the status a moment later."""
    deadline = time.monotonic() + CHILD_START_S
    while child.is_alive() and time.monotonic() < deadline:
        child.join(timeout=0.05)


def _children(count: int, *, other_than: int | None = None) -> list[multiprocessing.process.BaseProcess]:
    """The live children once exactly `count` are up, none of them `other_than` (an earlier test's, or a
    replaced process, may take a moment to exit on a loaded machine)."""
    deadline = time.monotonic() + CHILD_START_S
    while time.monotonic() < deadline:
        children = multiprocessing.active_children()
        if len(children) == count and other_than not in [p.pid for p in children]:
            break
        time.sleep(0.05)
    return children


def test_started_batch_processes_wait_for_the_first_batch_and_stay_while_small(
    in_children: Settings, alice: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(batch_processes, "IDLE_STOP_S", 0.2)
    app = create_app(in_children, dispatcher=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        app.state.ctx.batch_processes.start()  # as `ipab api` does
        (child,) = _children(1)  # up before any batch
        ref = upload(client, alice)
        _post(client, alice, ref, 2)
        time.sleep(1.0)  # five idle periods: a process that stayed small is kept
        assert [p.pid for p in multiprocessing.active_children()] == [child.pid]
        monkeypatch.setattr(batch_processes, "RECYCLE_RSS_BYTES", 0)
        _post(client, alice, ref, 2)
        _until_gone(child)  # swollen: replaced once idle, by a process started at once
        (fresh,) = _children(1, other_than=child.pid)
        assert not child.is_alive() and fresh.pid != child.pid


def _canceled(settings: Settings, batch_id: str) -> int:
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            where = (Job.batch_id == batch_id, Job.status == JobStatus.canceled.value)
            return int(session.scalar(select(func.count()).select_from(Job).where(*where)) or 0)
    finally:
        engine.dispose()


def test_a_batch_cancel_runs_in_a_batch_process_and_converges_when_that_process_dies(
    in_children: Settings, alice: dict[str, str], bob: dict[str, str]
) -> None:
    app = create_app(in_children, dispatcher=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        app.state.ctx.batch_processes.start()  # as `ipab api` does
        ref = upload(client, alice)
        created = client.post("/v1/batches", headers={**alice, **JSONL}, content=rows_body(ref, 20_000))
        assert created.status_code == 202, created.text
        batch_id = created.json()["id"]
        assert client.post(f"/v1/batches/{batch_id}/cancel", headers=bob).status_code == 404  # not bob's
        (child,) = multiprocessing.active_children()
        got: list[Any] = []
        thread = threading.Thread(
            target=lambda: got.append(client.post(f"/v1/batches/{batch_id}/cancel", headers=alice))
        )
        thread.start()
        deadline = time.monotonic() + CHILD_START_S
        while _canceled(in_children, batch_id) == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        os.kill(child.pid or 0, signal.SIGKILL)  # the cancel is the batch process's: killing it stops the cancel
        thread.join(timeout=CHILD_START_S)
        (r,) = got
        assert_problem(r, 503, "stopped before answering", "IPAB_API_BATCH_PROCESSES=1")
        assert 0 < _canceled(in_children, batch_id) < 20_000  # part way: chunks of 1,000, each whole
        again = client.post(f"/v1/batches/{batch_id}/cancel", headers=alice)  # asked again, it converges
        assert again.status_code == 200, again.text
        assert again.json()["counts"]["canceled"] == 20_000
        assert _canceled(in_children, batch_id) == 20_000


def test_a_cancel_never_waits_behind_another_tenants_batch_in_a_busy_batch_process(
    in_children: Settings, alice: dict[str, str], bob: dict[str, str]
) -> None:
    app = create_app(in_children, dispatcher=False)
    with TestClient(app, raise_server_exceptions=False) as client:
        app.state.ctx.batch_processes.start()  # as `ipab api` does: one process
        ref_a, ref_b = upload(client, alice), upload(client, bob)
        small = client.post("/v1/batches", headers={**bob, **JSONL}, content=rows_body(ref_b, 3))
        assert small.status_code == 202, small.text
        (child,) = multiprocessing.active_children()
        os.kill(child.pid or 0, signal.SIGSTOP)  # alice's batch will sit in the only batch process
        try:
            thread, got = _post_in_thread(client, alice, rows_body(ref_a, 50))
            time.sleep(0.5)
            canceled = client.post(f"/v1/batches/{small.json()['id']}/cancel", headers=bob)
            assert canceled.status_code == 200, canceled.text  # in the API process: the pool was busy
            assert canceled.json()["counts"]["canceled"] == 3
            assert not got  # alice's batch still waits for the stopped process
        finally:
            os.kill(child.pid or 0, signal.SIGCONT)
        thread.join(timeout=CHILD_START_S)
        assert got[0].status_code == 202, got[0].text


def process_id(_ctx: Any) -> int:
    """The pid of the process it runs in (called through BatchProcesses.call)."""
    return os.getpid()


def test_a_gallery_is_rendered_in_a_batch_process_as_the_api_process_would(
    api_settings: Settings, in_children: Settings, alice: dict[str, str], bob: dict[str, str]
) -> None:
    pages = []
    for settings in (api_settings, in_children):
        app = create_app(settings, dispatcher=False)
        with TestClient(app, raise_server_exceptions=False) as client:
            app.state.ctx.batch_processes.start()  # as `ipab api` does
            ref = upload(client, alice)
            batch = client.post("/v1/batches", headers={**alice, **JSONL}, content=rows_body(ref, 3)).json()["id"]
            ctx = app.state.ctx
            if settings is in_children:
                assert ctx.batch_processes.call(ctx, process_id) != os.getpid()  # the started pool's
            page = client.get(f"/v1/batches/{batch}/gallery", headers=alice)
            assert page.status_code == 200, page.text
            pages.append(re.sub(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", "ID", page.text.replace(batch, "BATCH")))
            assert client.get(f"/v1/batches/{batch}/gallery", headers=bob).status_code == 404  # not bob's
    assert pages[0] == pages[1]


def test_not_found_crosses_a_process_boundary_whole() -> None:
    error = pickle.loads(pickle.dumps(NotFound("batch", "b_1")))
    assert (type(error), error.kind, error.ref, str(error)) == (NotFound, "batch", "b_1", str(NotFound("batch", "b_1")))
