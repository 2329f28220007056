"""Tenant names (issue 21, item 12): one check for keys, plans and `--tenant`; reserved names are the operator's.

`default` holds what `ipab submit` sends without `--tenant`: a key for it would list and
cancel those batches. No key can be made for a reserved name, and a key made for one before
names were reserved is refused; plans and `--tenant` accept only names a key could own, or
`default` itself.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image
from sqlalchemy import func, select

from scheduler.tenants import RESERVED_TENANTS
from shared.db import ApiKey, Job, Tenant, make_engine, make_session_factory
from shared.settings import Settings
from tests.scheduler.plans.conftest import plan_fields, write_manifest, write_plan
from tests.scheduler.submission.conftest import Run, run_ipab, write_jsonl

MODULES = ("scheduler.cli.batches", "scheduler.cli.keys", "scheduler.cli.plans")
UNOWNABLE = ("Acme", "bad name", "-lead", "a" * 101)


@pytest.fixture
def ipab(settings: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[..., Run]:
    model_set = tmp_path / "model-set.toml"
    model_set.write_text('name = "tiny"\nbase = "b"\nip_adapter = "a.safetensors"\nimage_encoder = "e"\n')
    from tests.conftest import settings_env

    env = settings_env(settings.model_copy(update={"model_set": model_set}))

    def run(*argv: str) -> Run:
        return run_ipab(list(argv), env=env, monkeypatch=monkeypatch, modules=MODULES)

    return run


def _count(settings: Settings, column: object) -> int:
    engine = make_engine(settings.database_url)
    try:
        with make_session_factory(engine)() as session:
            return int(session.scalar(select(func.count(column))) or 0)  # type: ignore[call-overload]
    finally:
        engine.dispose()


def test_default_and_the_other_reserved_names_are_named_constants() -> None:
    assert "default" in RESERVED_TENANTS and {"admin", "system", "ipab"} <= set(RESERVED_TENANTS)


@pytest.mark.parametrize("tenant", RESERVED_TENANTS)
def test_no_key_can_be_made_for_a_reserved_tenant(ipab: Callable[..., Run], settings: Settings, tenant: str) -> None:
    run = ipab("keys", "create", "--tenant", tenant)
    assert run.code == 2 and "ipab_" not in run.out
    assert f"`--tenant` is {tenant!r}: is reserved" in run.err
    assert "choose another tenant name" in run.err
    assert _count(settings, ApiKey.id) == 0 and _count(settings, Tenant.name) == 0


@pytest.mark.parametrize("tenant", UNOWNABLE)
def test_submit_refuses_a_tenant_no_key_could_own_and_writes_nothing(
    ipab: Callable[..., Run], settings: Settings, tmp_path: Path, tenant: str
) -> None:
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "ref.png")
    manifest = write_jsonl(tmp_path / "rows.jsonl", [{"reference": "ref.png", "prompt": "a cat", "steps": 2}])
    run = ipab("submit", str(manifest), f"--tenant={tenant}")
    assert run.code == 2
    assert "`--tenant` is " in run.err and "must be 1 to 100 of a-z 0-9 _ . -" in run.err
    assert _count(settings, Job.id) == 0


@pytest.mark.parametrize("tenant", ["admin", "system", "ipab"])
def test_submit_refuses_a_reserved_name_other_than_default(
    ipab: Callable[..., Run], settings: Settings, tmp_path: Path, tenant: str
) -> None:
    Image.new("RGB", (32, 32), (1, 2, 3)).save(tmp_path / "ref.png")
    manifest = write_jsonl(tmp_path / "rows.jsonl", [{"reference": "ref.png", "prompt": "a cat", "steps": 2}])
    run = ipab("submit", str(manifest), "--tenant", tenant)
    assert run.code == 2 and f"`--tenant` is {tenant!r}: is reserved" in run.err
    assert _count(settings, Job.id) == 0


@pytest.mark.parametrize("tenant", [*UNOWNABLE, "system"])
def test_a_plan_naming_a_tenant_no_key_could_own_is_refused(
    ipab: Callable[..., Run], tmp_path: Path, tenant: str
) -> None:
    write_manifest(tmp_path)
    plan = write_plan(tmp_path, **plan_fields(tenant=tenant))
    run = ipab("plans", "apply", str(plan))
    assert run.code == 2
    assert f"{plan}: tenant: is {tenant[:20]!r}"[:-1] in run.err  # a long value is shown cut short
    assert "must be 1 to 100 of a-z" in run.err or "is reserved for the operator" in run.err


def test_a_plan_may_name_default_as_the_cli_may(ipab: Callable[..., Run], tmp_path: Path) -> None:
    write_manifest(tmp_path)
    assert ipab("plans", "apply", str(write_plan(tmp_path, **plan_fields(tenant="default")))).code == 0
