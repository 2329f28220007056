"""The API refuses webhook URLs by what their address reaches (literal hosts only: no DNS)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from scheduler.api.app import create_app
from shared.settings import Settings
from tests.scheduler.api.conftest import make_key


@pytest.fixture
def strict(api_settings: Settings) -> Iterator[tuple[TestClient, dict[str, str]]]:
    """A client of an app that refuses private webhook addresses (the default), and a tenant's headers."""
    settings = api_settings.model_copy(update={"webhook_allow_private": False})
    key, _ = make_key(settings, "acme")
    with TestClient(create_app(settings, dispatcher=False), raise_server_exceptions=False) as client:
        yield client, {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    ("url", "reaches"),
    [
        ("http://[::ffff:169.254.169.254]/latest/meta-data/", "169.254.169.254"),
        ("http://[64:ff9b::7f00:1]/hook", "127.0.0.1"),
        ("http://[2002:a00:1::]/hook", "10.0.0.1"),
        ("http://[::127.0.0.1]/hook", "127.0.0.1"),
        ("http://2130706433/hook", "127.0.0.1"),
        ("http://0x7f.1/hook", "127.0.0.1"),
    ],
)
def test_a_webhook_url_reaching_a_private_address_is_refused_naming_it(
    strict: tuple[TestClient, dict[str, str]], url: str, reaches: str
) -> None:
    client, headers = strict
    job = client.post("/v1/jobs", headers=headers, json={"references": ["x"], "prompt": "p", "webhook": {"url": url}})
    batch = client.post(
        "/v1/batches",
        params={"webhook_url": url},
        headers={**headers, "content-type": "application/jsonl"},
        content=b'{"references": ["x"], "prompt": "p"}\n',
    )
    for response in (job, batch):
        assert response.status_code == 422, response.text
        [error] = response.json()["errors"]
        assert error["field"] == "webhook.url"
        assert reaches in error["reason"], error
