"""A model set's [defaults] and [limits] at submission: rows get the set's defaults where they say
nothing, and rows outside its limits are refused with line and reason, from `ipab submit` and the API."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from scheduler.api.app import create_app
from scheduler.plans.planfile import PlanInvalid, read_plan_file
from scheduler.submission.manifest import parse_rows
from scheduler.submission.set_rules import apply_set_rules, set_rules_for
from shared.db import Plan
from shared.model_set import read_model_set, write_model_set
from shared.model_set_rules import NO_RULES, parse_rules
from shared.settings import Settings
from tests.scheduler.api.conftest import make_key, png_bytes
from tests.scheduler.plans.conftest import Clock, apply, plan_context, plan_fields, run_days, slots, write_plan
from tests.scheduler.submission.conftest import Run, load_jobs, run_ipab, write_jsonl, write_photos
from worker.download import PRESETS

FAST_SET = "tiny-fast-rules"
FAST = {
    "defaults": {"scheduler": "tcd", "steps": 4, "guidance_scale": 0.0, "eta": 0.3},
    "limits": {"steps": [2, 8], "guidance_scale": [0.0, 2.0]},
}


def fast_toml(folder: Path, name: str = FAST_SET) -> Path:
    """A fast model set's toml (the scheduler reads only the toml: no weights needed)."""
    path = folder / f"{name}.toml"
    write_model_set(
        path,
        name=name,
        base="base",
        ip_adapter="a.safetensors",
        image_encoder="e",
        loras=[("l.safetensors", 1.0)],
        **FAST,
    )
    return path


def plain_toml(folder: Path, name: str = "tiny-plain") -> Path:
    """A model set without rules, for IPAB_MODEL_SET when a submission names another set."""
    path = folder / f"{name}.toml"
    write_model_set(path, name=name, base="base", ip_adapter="a.safetensors", image_encoder="e")
    return path


def _rows(*rows: dict[str, Any], defaults: dict[str, Any] | None = None) -> Any:
    base = {"reference": "a.png", "prompt": "p", "seed": 1}
    return parse_rows([(i, {**base, **row}) for i, row in enumerate(rows, start=1)], defaults=defaults)


def test_the_sets_defaults_fill_what_a_row_and_the_submission_leave_out(tmp_path: Path) -> None:
    rules = read_model_set(fast_toml(tmp_path)).rules
    parsed = _rows({}, {"steps": 6}, {"scheduler": "euler_trailing"}, {"guidance_scale": 1.5}, defaults={"steps": 2})
    applied = apply_set_rules(parsed, rules, model_set=FAST_SET)
    assert applied.problems == []
    got = [(r.params.scheduler, r.params.steps, r.params.guidance_scale) for r in applied.rows]
    # `--set steps=2` is the submission's own choice: it beats the set's 4; row values beat both.
    assert got == [("tcd", 2, 0.0), ("tcd", 6, 0.0), ("euler_trailing", 2, 0.0), ("tcd", 2, 1.5)]
    assert applied.rows[0].params.width == 1024  # a field the set leaves alone keeps the global default


def test_rows_outside_the_sets_limits_are_refused_with_line_and_reason(tmp_path: Path) -> None:
    rules = read_model_set(fast_toml(tmp_path)).rules
    applied = apply_set_rules(_rows({}, {"steps": 30}, {"guidance_scale": 5.0}), rules, model_set=FAST_SET)
    assert [r.line for r in applied.rows] == [1]
    assert applied.problems == [
        (2, "steps", f"is 30: must be 2 to 8 on model set {FAST_SET!r} (its [limits])"),
        (3, "guidance_scale", f"is 5.0: must be 0 to 2 on model set {FAST_SET!r} (its [limits])"),
    ]
    assert applied.unchecked_references == {2: ("a.png",), 3: ("a.png",)}  # their files are checked too


def test_a_set_without_rules_changes_nothing(tmp_path: Path) -> None:
    parsed = _rows({}, {"steps": 30})
    assert apply_set_rules(parsed, NO_RULES, model_set="plain") is parsed


def test_the_rules_come_from_the_named_toml_or_ipab_model_sets(settings: Settings, tmp_path: Path) -> None:
    toml = fast_toml(tmp_path)
    assert set_rules_for(str(toml), FAST_SET, settings).defaults["steps"] == 4
    configured = settings.model_copy(update={"model_set": toml})
    assert set_rules_for(None, FAST_SET, configured).defaults["steps"] == 4
    assert set_rules_for(FAST_SET, FAST_SET, configured).ranges["steps"] == (2, 8)  # a bare name: IPAB_MODEL_SET's
    assert set_rules_for("other-set", "other-set", configured) is NO_RULES  # no toml of that name here


@pytest.fixture
def ipab(
    settings: Settings,
    settings_env: Callable[[Settings], dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> Callable[..., Run]:
    local = settings.model_copy(update={"reference_roots": [tmp_path]})

    def run(*argv: str) -> Run:
        return run_ipab(argv, env=settings_env(local), monkeypatch=monkeypatch)

    return run


def test_ipab_submit_fills_the_fast_sets_defaults_and_refuses_rows_past_its_limits(
    ipab: Callable[..., Run], settings: Settings, tmp_path: Path
) -> None:
    photo = str(write_photos(tmp_path / "photos")["coffee"])
    toml = fast_toml(tmp_path)
    good = write_jsonl(tmp_path / "good.jsonl", [{"reference": photo, "prompt": "a", "width": 512, "height": 512}])
    run = ipab("submit", str(good), "--model-set", str(toml))
    assert run.code == 0, run.err
    params = json.loads(load_jobs(settings)[0].spec)["params"]
    assert (params["scheduler"], params["steps"], params["guidance_scale"]) == ("tcd", 4, 0.0)

    rows = [{"reference": photo, "prompt": "b", "steps": 8}, {"reference": photo, "prompt": "c", "steps": 30}]
    run = ipab("submit", str(write_jsonl(tmp_path / "bad.jsonl", rows)), "--model-set", str(toml))
    assert run.code == 2
    assert f"line 2: steps: is 30: must be 2 to 8 on model set {FAST_SET!r}" in run.err
    assert len(load_jobs(settings)) == 1


@pytest.fixture
def fast_api(settings: Settings, tmp_path: Path) -> Iterator[tuple[TestClient, dict[str, str], Settings]]:
    api_settings = settings.model_copy(update={"model_set": fast_toml(tmp_path)})
    key, _ = make_key(api_settings, "alice")
    with TestClient(create_app(api_settings, dispatcher=False), raise_server_exceptions=False) as client:
        yield client, {"Authorization": f"Bearer {key}"}, api_settings


def test_the_api_fills_the_sets_defaults_and_refuses_a_job_past_its_limits(
    fast_api: tuple[TestClient, dict[str, str], Settings],
) -> None:
    client, alice, api_settings = fast_api
    r = client.post("/v1/references", headers=alice, files={"file": ("a.png", png_bytes(), "image/png")})
    ref = r.json()["id"]
    r = client.post("/v1/jobs", headers=alice, json={"references": [ref], "prompt": "a cat", "steps": 30})
    assert r.status_code == 422, r.text
    assert f"steps: is 30: must be 2 to 8 on model set {FAST_SET!r}" in r.json()["detail"]
    r = client.post("/v1/jobs", headers=alice, json={"references": [ref], "prompt": "a cat", "scheduler": "lcm"})
    assert r.status_code == 202, r.text
    params = json.loads(load_jobs(api_settings)[0].spec)["params"]
    assert (params["scheduler"], params["steps"], params["guidance_scale"]) == ("lcm", 4, 0.0)
    body = "\n".join(json.dumps({"references": [ref], "prompt": p, "steps": s}) for p, s in [("x", 4), ("y", 9)])
    r = client.post("/v1/batches", headers={**alice, "content-type": "application/jsonl"}, content=body)
    assert r.status_code == 422 and "line 2: steps: is 9" in r.json()["detail"]


def test_a_grid_on_the_fast_set_gets_its_defaults_and_its_cells_past_the_limits_are_refused_by_line(
    ipab: Callable[..., Run], settings: Settings, tmp_path: Path
) -> None:
    photo = str(write_photos(tmp_path / "photos")["coffee"])
    toml = fast_toml(tmp_path)
    grid = tmp_path / "grid.toml"
    grid.write_text(
        f'[fixed]\nreferences = "{photo}"\nwidth = 512\nheight = 512\n[axes]\nprompts = ["a"]\nsteps = [4, 30]\n'
    )
    run = ipab("submit", str(grid), "--model-set", str(toml))
    assert run.code == 2
    assert f"line 2: steps: is 30: must be 2 to 8 on model set {FAST_SET!r}" in run.err
    assert load_jobs(settings) == []
    grid.write_text(f'[fixed]\nreferences = "{photo}"\nwidth = 512\nheight = 512\n[axes]\nprompts = ["a", "b"]\n')
    run = ipab("submit", str(grid), "--model-set", str(toml))
    assert run.code == 0, run.err
    params = [json.loads(job.spec)["params"] for job in load_jobs(settings)]
    assert {(p["scheduler"], p["steps"], p["guidance_scale"]) for p in params} == {("tcd", 4, 0.0)}


def test_a_plan_on_the_fast_set_is_refused_at_apply_for_rows_past_its_limits_and_its_slots_get_its_defaults(
    settings: Settings, tmp_path: Path
) -> None:
    local = settings.model_copy(update={"model_set": fast_toml(tmp_path), "reference_roots": [tmp_path]})
    write_photos(tmp_path / "photos")
    rows = [{"reference": "photos/coffee.jpg", "prompt": "a"}, {"reference": "photos/coffee.jpg", "prompt": "b"}]
    write_jsonl(tmp_path / "rows.jsonl", [*rows, {**rows[0], "steps": 30}])
    plan = write_plan(tmp_path, **plan_fields(model_set=FAST_SET))
    with pytest.raises(PlanInvalid, match=rf"manifest: line 3: steps: is 30: must be 2 to 8 on model set '{FAST_SET}'"):
        read_plan_file(plan, settings=local)

    write_jsonl(tmp_path / "rows.jsonl", rows)
    clock = Clock(datetime(2026, 5, 1, 1, 0))
    with plan_context(local, clock) as ctx:
        apply(ctx, plan)
        run_days(ctx, clock, 1, at=timedelta(hours=2, seconds=5))
    params = [json.loads(job.spec)["params"] for job in load_jobs(local)]
    assert len(params) == 2
    assert {(p["scheduler"], p["steps"], p["guidance_scale"]) for p in params} == {("tcd", 4, 0.0)}


def _plan_rows(folder: Path, *extra: dict[str, Any]) -> None:
    write_photos(folder / "photos")
    rows = [{"reference": "photos/coffee.jpg", "prompt": "a"}, {"reference": "photos/coffee.jpg", "prompt": "b"}]
    write_jsonl(folder / "rows.jsonl", [*rows, *extra])


def test_a_plan_naming_the_fast_sets_toml_gets_its_rules_at_apply_and_at_every_slot_whatever_ipab_model_set_is(
    settings: Settings, tmp_path: Path
) -> None:
    # IPAB_MODEL_SET names another set: the plan's own toml is what counts.
    local = settings.model_copy(update={"model_set": plain_toml(tmp_path), "reference_roots": [tmp_path]})
    fast_toml(tmp_path, name="fast")
    _plan_rows(tmp_path, {"reference": "photos/coffee.jpg", "prompt": "c", "steps": 30})
    plan = write_plan(tmp_path, **plan_fields(model_set="fast.toml"))
    with pytest.raises(PlanInvalid, match=r"manifest: line 3: steps: is 30: must be 2 to 8 on model set 'fast'"):
        read_plan_file(plan, settings=local)

    _plan_rows(tmp_path)
    clock = Clock(datetime(2026, 5, 1, 1, 0))
    with plan_context(local, clock) as ctx:
        apply(ctx, plan)
        run_days(ctx, clock, 1)
        with ctx.sessions() as session:
            stored = session.query(Plan).one()
            assert (stored.model_set, stored.model_set_file) == ("fast", str(tmp_path / "fast.toml"))
    params = [json.loads(job.spec)["params"] for job in load_jobs(local)]
    assert [(p["scheduler"], p["steps"], p["guidance_scale"]) for p in params] == [("tcd", 4, 0.0)] * 2


def test_a_slot_fails_with_the_reason_when_its_plans_set_toml_now_names_another_set(
    settings: Settings, tmp_path: Path
) -> None:
    local = settings.model_copy(update={"model_set": plain_toml(tmp_path), "reference_roots": [tmp_path]})
    fast_toml(tmp_path, name="fast")
    _plan_rows(tmp_path)
    plan = write_plan(tmp_path, **plan_fields(model_set="fast.toml"))
    clock = Clock(datetime(2026, 5, 1, 1, 0))
    with plan_context(local, clock) as ctx:
        apply(ctx, plan)
        fast_toml(tmp_path, name="renamed").replace(tmp_path / "fast.toml")
        run_days(ctx, clock, 1)
        [slot] = slots(ctx.sessions)
    assert slot.status == "failed"
    assert f"model set file {tmp_path / 'fast.toml'} now names set 'renamed', not 'fast'" in (slot.reason or "")
    assert load_jobs(local) == []


def test_a_bare_set_name_without_a_toml_here_is_submitted_with_a_warning_that_names_the_fix(
    settings: Settings,
    settings_env: Callable[[Settings], dict[str, str]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    photo = str(write_photos(tmp_path / "photos")["coffee"])
    manifest = write_jsonl(tmp_path / "rows.jsonl", [{"reference": photo, "prompt": "a", "steps": 30}])
    plain = plain_toml(tmp_path)
    configured = settings.model_copy(update={"model_set": plain, "reference_roots": [tmp_path]})

    def ipab(*argv: str) -> Run:
        return run_ipab(argv, env=settings_env(configured), monkeypatch=monkeypatch)

    run = ipab("submit", str(manifest), "--model-set", FAST_SET)  # IPAB_MODEL_SET is another set
    assert run.code == 0, run.err
    assert f"warning: `--model-set` is {FAST_SET!r}: this host has no model-set toml of that set" in run.err
    assert f"(IPAB_MODEL_SET is {plain})" in run.err and "[defaults] and [limits] are not applied" in run.err
    assert "--model-set path/to/model-set.toml" in run.err
    # The set IPAB_MODEL_SET names, by its name: its rules apply, nothing to warn of.
    run = ipab("submit", str(manifest), "--model-set", "tiny-plain", "--batch", "b2")
    assert run.code == 0 and "warning" not in run.err

    # A plan naming a set by a name this host has no toml of is applied, with the same warning.
    _plan_rows(tmp_path)
    spec = read_plan_file(write_plan(tmp_path, **plan_fields(model_set=FAST_SET)), settings=configured)
    [warning] = spec.warnings
    assert warning.startswith(f"`model_set` is {FAST_SET!r}: this host has no model-set toml of that set")
    assert '(model_set = "path/to/model-set.toml")' in warning
    named = write_plan(tmp_path, **plan_fields(model_set="tiny-plain"))  # IPAB_MODEL_SET's set: its rules, no warning
    assert read_plan_file(named, settings=configured).warnings == ()


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_presets_limits_refuse_a_job_that_asks_for_another_scheduler_with_line_and_reason(preset: str) -> None:
    chosen = PRESETS[preset]
    rules = parse_rules(chosen.defaults, chosen.limits)
    applied = apply_set_rules(_rows({}, {"scheduler": "euler"}), rules, model_set=preset)
    assert [r.params.scheduler for r in applied.rows] == [chosen.defaults["scheduler"]]
    own = chosen.defaults["scheduler"]
    assert applied.problems == [(2, "scheduler", f"is 'euler': must be one of {own} on model set {preset!r}")]
