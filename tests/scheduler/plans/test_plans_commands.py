"""`ipab plans ...` in process: apply validates everything and is all or nothing; run, history, pause, delete."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from shared.settings import Settings
from tests.conftest import settings_env
from tests.scheduler.plans.conftest import plan_fields, write_manifest, write_plan
from tests.scheduler.submission.conftest import Run, run_ipab

MODULES = ("scheduler.cli.plans",)


@pytest.fixture
def env(settings: Settings, database_url: str) -> dict[str, str]:
    return settings_env(settings.model_copy(update={"database_url": database_url}))


def ipab(env: dict[str, str], monkeypatch: pytest.MonkeyPatch, *argv: str) -> Run:
    return run_ipab(list(argv), env=env, monkeypatch=monkeypatch, modules=MODULES)


BAD_FILES: dict[str, tuple[dict[str, Any], str]] = {
    "bad cron": ({"schedule": "0 25 * * *"}, "schedule: is '0 25 * * *': is not a cron expression"),
    "unknown timezone": ({"timezone": "Europe/Gondor"}, "timezone: is 'Europe/Gondor': is not a known time zone"),
    "missing manifest": ({"manifest": "gone.jsonl"}, "manifest: is 'gone.jsonl': does not exist (looked for "),
    "bad rows": ({"manifest": "bad.jsonl"}, "manifest: line 2: prompt: "),
    "missing reference": ({"manifest": "noref.jsonl"}, "manifest: line 1: reference: is 'missing.png': does not exist"),
    "bad set value": ({"set": {"steps": "many"}}, "set.steps: "),
    "unknown field": ({"colour": "red"}, "colour: is not a plan field; allowed: name, schedule"),
    "bad catch_up": ({"catch_up": "sometimes"}, "catch_up: is 'sometimes': must be one of: latest, all, none"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_apply_refuses_a_bad_plan_file_with_the_reason_and_changes_nothing(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path, case: str
) -> None:
    write_manifest(tmp_path)
    (tmp_path / "bad.jsonl").write_text('{"reference": "ref.png", "prompt": "ok"}\n{"reference": "ref.png"}\n')
    (tmp_path / "noref.jsonl").write_text('{"reference": "missing.png", "prompt": "p"}\n')
    assert ipab(env, monkeypatch, "plans", "apply", str(write_plan(tmp_path, **plan_fields()))).code == 0
    before = ipab(env, monkeypatch, "plans", "show", "nightly").out

    fields, reason = BAD_FILES[case]
    changed = write_plan(tmp_path, "changed.toml", **plan_fields(schedule="0 3 * * *"))
    bad = write_plan(tmp_path, "bad.toml", **plan_fields(name="other", **fields))
    run = ipab(env, monkeypatch, "plans", "apply", str(changed), str(bad))

    assert run.code == 2
    assert f"{bad}: {reason}" in run.err
    assert "no plan applied. Fix them and apply again" in run.err
    assert ipab(env, monkeypatch, "plans", "show", "nightly").out == before  # the good file was not applied either
    assert [line.split("\t")[0] for line in ipab(env, monkeypatch, "plans", "list").out.splitlines()] == [
        "name",
        "nightly",
    ]


def test_apply_creates_then_leaves_alone_then_updates(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write_manifest(tmp_path)
    path = write_plan(tmp_path, **plan_fields(timezone="Europe/Berlin"))
    outs = [ipab(env, monkeypatch, "plans", "apply", str(path)).out for _ in range(2)]
    write_plan(tmp_path, **plan_fields(timezone="Europe/Berlin", set={"steps": 3}))
    outs.append(ipab(env, monkeypatch, "plans", "apply", str(path)).out)

    assert [out.split(";")[0] for out in outs] == [
        "plan nightly: created",
        "plan nightly: unchanged",
        "plan nightly: updated",
    ]
    first, secret = outs[0].splitlines()
    assert first.endswith("T02:00:00+01:00")  # next slot, in the plan's zone
    assert secret.startswith("webhook signing secret of new tenant default (shown once): whsec_")
    assert "whsec_" not in outs[1] + outs[2]  # the tenant exists: its secret is not shown again
    show = ipab(env, monkeypatch, "plans", "show", "nightly").out
    assert 'set: {"steps": 3}' in show and "lane: scheduled" in show and "catch_up: latest" in show


def test_run_now_is_its_own_slot_and_history_pause_resume_delete_work(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    write_manifest(tmp_path)
    ipab(env, monkeypatch, "plans", "apply", str(write_plan(tmp_path, **plan_fields())))

    run = ipab(env, monkeypatch, "plans", "run", "nightly", "--now")
    assert run.code == 0, run.err
    assert run.out.startswith("batch nightly@") and "+00:00: 2 job(s) submitted" in run.out
    history = ipab(env, monkeypatch, "plans", "history", "nightly").out.splitlines()
    assert history[0].split("\t") == ["slot", "kind", "status", "batch", "jobs", "reason"]
    slot, kind, status, batch, jobs, _ = history[1].split("\t")
    assert (kind, status, batch, jobs) == ("manual", "submitted", f"nightly@{slot}", "2 jobs: queued 2")
    listed = ipab(env, monkeypatch, "plans", "list").out.splitlines()[1].split("\t")
    assert listed[5:] == [slot, "submitted", "2 jobs: queued 2"]

    assert ipab(env, monkeypatch, "plans", "pause", "nightly").out == "plan nightly: paused\n"
    assert ipab(env, monkeypatch, "plans", "list").out.splitlines()[1].split("\t")[1] == "paused"
    assert "resumed" in ipab(env, monkeypatch, "plans", "resume", "nightly").out
    deleted = ipab(env, monkeypatch, "plans", "delete", "nightly")
    assert deleted.out == "plan nightly: deleted with 1 slot record(s); its batches stay\n"
    assert ipab(env, monkeypatch, "plans", "list").out.splitlines() == [
        "name\tstate\tschedule\ttimezone\tnext_slot\tlast_slot\tlast_status\tlast"
    ]
    unknown = ipab(env, monkeypatch, "plans", "history", "nightly")
    assert unknown.code == 2 and "`NAME` is 'nightly': no plan has this name" in unknown.err


def test_a_bad_set_table_names_the_field(settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    write_manifest(tmp_path)
    bad = write_plan(tmp_path, **plan_fields(set={"width": 13, "seeds": 2}))
    run = ipab(settings_env(settings), monkeypatch, "plans", "apply", str(bad))
    assert run.code == 2
    assert f"{bad}: set.seeds: is 2: is not a job field; allowed: reference, prompt" in run.err


def test_plans_and_beat_run_where_torch_cannot_be_imported(
    settings: Settings, ipab_without_gpu_stack: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("IPAB_")} | settings_env(settings)
    write_manifest(tmp_path)
    write_plan(tmp_path, **plan_fields())
    for argv in (
        ["plans", "apply", "plan.toml"],
        ["plans", "run", "nightly", "--now"],
        ["beat", "--passes", "1"],
        ["plans", "history", "nightly"],
    ):
        done = ipab_without_gpu_stack(env, *argv)
        assert done.returncode == 0, (argv, done.stderr)
