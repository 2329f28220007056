"""End to end: `ipab submit` -> SQL + Redis -> a real `ipab worker` process -> S3 + SQL."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import redis
from sqlalchemy import select

from shared import keys
from shared.db import Job, JobStatus, make_engine, make_session_factory
from shared.model_set import read_model_set
from shared.settings import Settings
from shared.spec import parse_spec
from shared.storage import ObjectStore
from tests.system.conftest import Workers, submit, wait_for_batch, worker_pool, write_manifest


def run_batch_end_to_end(settings: Settings, workers: Workers, tmp_path: Path) -> None:
    manifest = write_manifest(tmp_path, rows=20)
    workers.start()
    batch_id = submit(workers, manifest, "e2e")
    wait_for_batch(settings, batch_id, workers=workers)

    sessions = make_session_factory(make_engine(settings.database_url))
    with sessions() as session:
        jobs = session.scalars(select(Job).where(Job.batch_id == batch_id)).all()
    assert [j.status for j in jobs] == [JobStatus.succeeded.value] * 20, workers.log_text()
    store = ObjectStore.from_settings(settings)
    assert sorted(store.list_keys(f"outputs/{batch_id}/")) == sorted(
        keys.output_key(batch_id, j.id, j.attempts) for j in jobs
    )
    assert len(store.list_keys("refs/")) == 3  # each reference uploaded once
    for job in jobs:
        png = store.get(job.output_key or "")
        assert hashlib.sha256(png).hexdigest() == job.output_sha256
        assert store.head(job.output_key or "") == {
            "job-id": job.id,
            "seed": str(job.seed),
            "sha256": job.output_sha256,
        }
    assert_equal_to_direct_model_calls(settings, store, jobs[:3])

    # Re-submitting the same manifest to the same batch adds nothing and enqueues nothing.
    assert submit(workers, manifest, "e2e") == batch_id
    client = redis.Redis.from_url(settings.redis_url)
    queue = keys.render_queue(read_model_set(settings.model_set or Path()).name)
    assert client.llen(queue) == 0
    with sessions() as session:
        assert len(session.scalars(select(Job.id).where(Job.batch_id == batch_id)).all()) == 20


def assert_equal_to_direct_model_calls(settings: Settings, store: ObjectStore, jobs: list[Job]) -> None:
    """The worker's PNG is what the model layer gives for the same job, byte for byte."""
    import torch

    from shared.images import decode_reference
    from worker.pipeline import Renderer
    from worker.png import encode_png
    from worker.provenance import Provenance, model_set_hashes

    torch.set_num_threads(1)  # as the worker (OMP_NUM_THREADS=1): same float reductions
    renderer = Renderer.load(read_model_set(settings.model_set or Path()), device="cpu", dtype="auto")
    provenance = Provenance.of(renderer, hashes=model_set_hashes(renderer.config))
    for job in jobs:
        spec = parse_spec(json.loads(job.spec))
        embeds = renderer.encode([decode_reference(store.get(r.key)) for r in spec.references])
        image = renderer.generate(spec.params, embeds)
        png = encode_png(image, params=spec.params, model_set=renderer.name, provenance=provenance)
        assert png == store.get(job.output_key or "")
        assert json.loads(job.provenance or "null") == provenance.to_json()


def test_manifest_runs_end_to_end_on_sqlite(system_settings: Settings, workers: Workers, tmp_path: Path) -> None:
    run_batch_end_to_end(system_settings, workers, tmp_path)


@pytest.mark.postgres
def test_manifest_runs_end_to_end_on_postgres(
    system_settings: Settings, postgres_url: str, settings_env: Callable[[Settings], dict[str, str]], tmp_path: Path
) -> None:
    settings = system_settings.model_copy(update={"database_url": postgres_url})
    with worker_pool(settings, settings_env, tmp_path) as pool:
        run_batch_end_to_end(settings, pool, tmp_path)
