"""A tenant's purge takes what Redis holds of the tenant, and nothing of the fleet's: a tenant named
like a key's kind (`queued`, `emb`, `stats`, `rate`), a lock, or a model set keeps those keys for everybody.
On SQLite and PostgreSQL, against the test's Redis."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from scheduler.batches.deletion import purge_tenant
from shared import keys
from shared.db import Job
from shared.wire import message_text, render_envelopes
from tests.shared.conftest import ENCODER, World

MODEL_SET = "m"  # the model set of the world's batches


def _enqueue(world: World, job_ids: list[str]) -> None:
    """The jobs' render messages in their queue, as the dispatcher pushes them."""
    queue = keys.render_queue(MODEL_SET)
    with world.sessions() as session:
        rows = session.execute(select(Job.id, Job.batch_id, Job.spec).where(Job.id.in_(job_ids))).all()
    texts = [(job, message_text(job_id=job, batch_id=batch, spec_json=spec)) for job, batch, spec in rows]
    world.redis.lpush(queue, *render_envelopes(queue=queue, messages=texts))


@pytest.mark.parametrize("tenant", ["queued", "emb", "stats", "embed_cache", "rate", "janitor-lock", MODEL_SET])
def test_a_purge_takes_the_tenants_keys_and_messages_and_leaves_the_fleets(world: World, tenant: str) -> None:
    _, theirs = world.batch("theirs", jobs=2, status="queued", tenant=tenant)
    _, bobs = world.batch("bobs", jobs=2, status="queued", tenant="bob")
    _enqueue(world, theirs + bobs)
    p = world.settings.redis_prefix
    sha = world.images["a"]
    fleet = [
        p + keys.QUEUED_SET,
        p + keys.EMBED_KEY.format(cache_key=f"{ENCODER}:{sha}"),  # written by world.image
        p + keys.STATS_KEY.format(name="embed_cache"),
        p + keys.PROGRESS_KEY.format(job_id=bobs[0]),
        p + keys.RATE_BUCKET_KEY.format(tenant="bob"),
        p + keys.JANITOR_LOCK_KEY,
        p + keys.DISPATCH_LOCK_KEY.format(model_set=MODEL_SET),
    ]
    world.redis.sadd(fleet[0], *bobs)
    for name in fleet[2:]:
        world.redis.set(name, b"the fleet's")
    theirs_keys = [p + keys.RATE_BUCKET_KEY.format(tenant=tenant), p + keys.PROGRESS_KEY.format(job_id=theirs[0])]
    for name in theirs_keys:
        world.redis.set(name, b"1")

    purge_tenant(
        sessions=world.sessions, store=world.store, redis_client=world.redis, settings=world.settings, tenant=tenant
    )

    assert [name for name in fleet if not world.redis.exists(name)] == []
    assert [name for name in theirs_keys if world.redis.exists(name)] == []
    assert world.redis.smembers(p + keys.QUEUED_SET) == {job_id.encode() for job_id in bobs}
    left = world.redis.lrange(keys.render_queue(MODEL_SET), 0, -1)
    assert sorted(job_id for job_id in theirs + bobs if any(job_id.encode() in item for item in left)) == sorted(bobs)
