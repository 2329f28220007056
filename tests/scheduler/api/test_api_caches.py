"""The API's hot-path caches: what they may serve stale, for how long, and what never touches S3."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from scheduler.api.caches import FORECAST_CACHE_S, ExpiringCache
from shared.dispatch.position import BacklogSnapshots
from shared.storage import ObjectStore
from tests.scheduler.api.conftest import png_bytes, upload

JOB = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64}


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now_s = 100.0

    def __call__(self) -> float:
        return self.now_s


def test_an_entry_is_served_until_its_ttl_passes_then_forgotten() -> None:
    clock = Clock()
    cache: ExpiringCache[str, int] = ExpiringCache(ttl_s=5.0, clock=clock)
    cache.put("a", 1)
    clock.now_s += 4.9
    assert cache.get("a") == 1
    clock.now_s += 0.1
    assert cache.get("a") is None


def test_a_full_cache_drops_its_oldest_entry_first() -> None:
    cache: ExpiringCache[str, int] = ExpiringCache(ttl_s=60.0, max_entries=2)
    for i, key in enumerate("abc"):
        cache.put(key, i)
    assert (cache.get("a"), cache.get("b"), cache.get("c")) == (None, 1, 2)


def test_update_changes_a_live_count_and_keeps_its_expiry_but_adds_no_entry() -> None:
    clock = Clock()
    cache: ExpiringCache[str, int] = ExpiringCache(ttl_s=1.0, clock=clock)
    cache.update("t", lambda n: n + 1)
    assert cache.get("t") is None
    cache.put("t", 3)
    cache.update("t", lambda n: n + 2)
    assert cache.get("t") == 5
    clock.now_s += 1.0
    assert cache.get("t") is None


def test_a_zero_ttl_caches_nothing() -> None:
    cache: ExpiringCache[str, int] = ExpiringCache(ttl_s=0)
    cache.put("a", 1)
    assert cache.get("a") is None


def test_a_job_on_an_uploaded_reference_is_queued_without_asking_s3(
    client: TestClient, alice: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    r = client.post("/v1/references", headers=alice, files={"file": ("a.png", png_bytes(), "image/png")})
    ref = r.json()["id"]
    asked: list[str] = []
    original = ObjectStore.exists

    def counted(self: ObjectStore, key: str) -> bool:
        asked.append(key)
        return original(self, key)

    monkeypatch.setattr(ObjectStore, "exists", counted)
    for seed in (1, 2):
        r = client.post("/v1/jobs", headers=alice, json={**JOB, "references": [ref], "seed": seed})
        assert r.status_code == 202, r.text
    assert asked == []


def test_a_queue_position_is_recomputed_at_most_once_per_forecast_ttl(
    client: TestClient, alice: dict[str, str]
) -> None:
    """A client polling its queued job gets the forecast made up to FORECAST_CACHE_S ago, then a fresh one."""
    clock = Clock()
    ctx = client.app.state.ctx  # type: ignore[attr-defined]
    ctx.forecasts = ExpiringCache(ttl_s=FORECAST_CACHE_S, clock=clock)
    ctx.backlog = BacklogSnapshots(ctx.sessions, max_age_s=0.0, max_stale_s=0.0)  # counts read with every forecast
    ref = upload(client, alice)
    rows = "".join(f'{{"references": ["{ref}"], "prompt": "row {i}", "seed": {i}}}\n' for i in range(5))
    batch = client.post("/v1/batches", headers={**alice, "Content-Type": "application/jsonl"}, content=rows)
    assert batch.status_code == 202, batch.text
    batch_url = f"/v1/batches/{batch.json()['id']}"
    assert client.get(batch_url, headers=alice).json()["queue_position"] == 4
    job = client.post("/v1/jobs", headers=alice, json={**JOB, "references": [ref]})  # interactive: starts first
    assert job.status_code == 202, job.text
    clock.now_s += FORECAST_CACHE_S * 0.9
    assert client.get(batch_url, headers=alice).json()["queue_position"] == 4  # the forecast of a moment ago
    clock.now_s += FORECAST_CACHE_S * 0.2
    assert client.get(batch_url, headers=alice).json()["queue_position"] == 5  # made again: one more ahead
    assert client.get(f"/v1/jobs/{job.json()['id']}", headers=alice).json()["queue_position"] == 0
