"""A plan sent over the API never reads the server's disk (issue 21, item 13): every reference of
its `s3://` manifest must be an `s3://` URI, when it is applied and at every slot, and no
refusal shows a path of the server."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from shared.settings import Settings
from shared.storage import ObjectStore
from tests.scheduler.api.conftest import TOML, assert_problem, plan_toml, png_bytes, put_manifest

REMOTE_ONLY = "must be an s3:// uri"


def put_rows(settings: Settings, references: list[str], key: str = "plans/rows.jsonl") -> str:
    """A manifest of one row per reference, as written, in the test bucket; its s3:// URI."""
    store = ObjectStore.from_settings(settings)
    lines = [{"reference": ref, "prompt": f"prompt {i}", "seed": i, "steps": 2} for i, ref in enumerate(references)]
    store.put(key, "".join(json.dumps(line) + "\n" for line in lines).encode())
    return store.uri(key)


def assert_no_server_path(text: str, *folders: Path) -> None:
    for folder in (Path.cwd(), Path(tempfile.gettempdir()), *folders):
        assert str(folder) not in text, (str(folder), text)
    assert "resolves to" not in text and "looked for" not in text, text


@pytest.fixture
def served_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The API's working folder, holding an image a caller must not be able to read."""
    folder = tmp_path / "server"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "a.png").write_bytes(png_bytes((9, 9, 9)))
    (folder / "secret.png").write_bytes(png_bytes((1, 1, 1)))
    monkeypatch.chdir(folder)
    return folder


@pytest.mark.parametrize("reference", ["refs/a.png", "secret.png", "../../etc/passwd", "./secret.png"])
def test_a_plan_whose_s3_manifest_names_a_local_reference_is_refused_without_a_server_path(
    client: TestClient, admin: dict[str, str], api_settings: Settings, served_from: Path, reference: str
) -> None:
    text = plan_toml(manifest=put_rows(api_settings, [reference]))
    r = client.post("/v1/plans", headers={**admin, **TOML}, content=text)
    assert_problem(r, 422, "reference", REMOTE_ONLY, repr(reference))
    assert_no_server_path(r.text, served_from)
    assert client.get("/v1/plans", headers=admin).json() == []


def test_an_absolute_local_reference_is_refused_before_anything_is_read(
    client: TestClient, admin: dict[str, str], api_settings: Settings, served_from: Path
) -> None:
    secret = str(served_from / "secret.png")
    r = client.post(
        "/v1/plans", headers={**admin, **TOML}, content=plan_toml(manifest=put_rows(api_settings, [secret]))
    )
    assert_problem(r, 422, "reference", REMOTE_ONLY)
    assert "outside the allowed folders" not in r.text and "IPAB_REFERENCE_ROOTS" not in r.text


def test_an_empty_s3_manifest_is_named_by_its_uri_not_by_a_temporary_file(
    client: TestClient, admin: dict[str, str], api_settings: Settings, served_from: Path
) -> None:
    store = ObjectStore.from_settings(api_settings)
    store.put("plans/empty.jsonl", b"")
    r = client.post("/v1/plans", headers={**admin, **TOML}, content=plan_toml(manifest=store.uri("plans/empty.jsonl")))
    assert_problem(r, 422, "has no rows", store.uri("plans/empty.jsonl"))
    assert_no_server_path(r.text, served_from)


def _history(client: TestClient, admin: dict[str, str]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = client.get("/v1/plans/nightly/history", headers=admin).json()
    return found


def test_a_plan_from_the_api_stays_remote_only_at_slot_time(
    client: TestClient, admin: dict[str, str], alice: dict[str, str], api_settings: Settings, served_from: Path
) -> None:
    manifest = put_manifest(api_settings)
    assert client.post("/v1/plans", headers={**admin, **TOML}, content=plan_toml(manifest=manifest)).status_code == 201
    # The manifest changes after the plan was applied: now it names a file of the server.
    put_rows(api_settings, ["secret.png"])
    run = client.post("/v1/plans/nightly/run", headers=admin)
    assert_problem(run, 422, "failed", "reference", REMOTE_ONLY)
    assert_no_server_path(run.text, served_from)
    [slot] = _history(client, admin)
    assert slot["status"] == "failed" and REMOTE_ONLY in slot["reason"].lower()
    assert_no_server_path(json.dumps(slot), served_from)
    assert client.get("/v1/batches", headers=alice).json() == []  # nothing was submitted
