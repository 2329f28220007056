"""Names of things in Redis and object storage, in one place.

Object keys are deterministic (content hashes, job ids and attempt numbers), so a re-run
writes the same object again instead of a second one. Outputs are keyed by attempt too:
a late upload from an expired attempt can never overwrite the attempt that won.
"""

from __future__ import annotations

from typing import Final

REF_KEY: Final = "refs/{sha256}.{ext}"
OUTPUT_KEY: Final = "outputs/{batch_id}/{job_id}.{attempt}.png"
EMBEDDING_KEY: Final = "embeddings/{encoder}/{sha256}.safetensors"
OUTPUTS_PREFIX: Final = "outputs/{batch_id}/"  # every attempt's output of a batch's jobs
EMBEDDINGS_PREFIX: Final = "embeddings/"  # one folder per image encoder

# Redis keys, each under the settings' `redis_prefix`.
QUEUED_SET: Final = "queued"  # job ids whose message is in Redis (the outbox's mirror)
EMBED_KEY: Final = "emb:{cache_key}"  # cached embeddings, safetensors bytes
EMBED_LOCK_KEY: Final = "emb-lock:{cache_key}"  # single-flight lock for one encode
RECONCILER_LOCK_KEY: Final = "reconciler-lock"  # only one reconciler runs at a time
DISPATCH_LOCK_KEY: Final = "dispatch-lock:{model_set}"  # only one dispatcher per model set works at a time
DISPATCH_WAKE_KEY: Final = "dispatch-wake:{model_set}"  # bumped by submissions: the dispatcher re-reads SQL
DISPATCH_SIGNAL_KEY: Final = "dispatch-signal:{model_set}"  # the list an idle dispatcher blocks on (BLPOP)
# Set by a dispatcher that has new work and a full queue: the next worker's take signals it.
DISPATCH_WANTED_KEY: Final = "dispatch-wanted:{model_set}"
# The queue length at which a worker's take signals the dispatcher, while its queue is deeper than
# IPAB_DISPATCH_DEPTH (IPAB_DISPATCH_HORIZON_S); it lapses with the dispatcher's lock.
DISPATCH_LEVEL_KEY: Final = "dispatch-level:{model_set}"
JANITOR_LOCK_KEY: Final = "janitor-lock"  # only one janitor works at a time
JANITOR_SIGNAL_KEY: Final = "janitor-signal"  # the list an idle janitor blocks on (BLPOP): a deletion was asked
STATS_KEY: Final = "stats:{name}"  # fleet-wide counters (hash)
RATE_BUCKET_KEY: Final = "rate:{tenant}"  # a tenant's API request token bucket (hash: tokens, at_ms)
BODY_BUCKET_KEY: Final = "body-rate:{tenant}"  # a tenant's API body-bytes bucket (hash: tokens, at_ms)
KEY_LOOKUP_BUCKET_KEY: Final = "key-lookups:{client}"  # API key lookups in SQL per client address (hash)
PROGRESS_KEY: Final = "progress:{job_id}"  # a running job's denoising step (JSON, expires)

RENDER_QUEUE: Final = "ipab.render.{model_set}"


def ref_key(sha256: str, ext: str) -> str:
    """Where a reference image lives: `refs/<sha256>.<ext>`."""
    return REF_KEY.format(sha256=sha256, ext=ext)


def output_key(batch_id: str, job_id: str, attempt: int) -> str:
    """Where one attempt of a job writes its PNG: `outputs/<batch>/<job>.<attempt>.png`.

    The job's row records the key of the attempt that finished (`jobs.output_key`).
    """
    return OUTPUT_KEY.format(batch_id=batch_id, job_id=job_id, attempt=attempt)


def outputs_prefix(batch_id: str) -> str:
    """Where every attempt of every job of a batch writes: `outputs/<batch>/`."""
    return OUTPUTS_PREFIX.format(batch_id=batch_id)


def embedding_key(encoder: str, sha256: str) -> str:
    """Where the durable copy of an embedding lives."""
    return EMBEDDING_KEY.format(encoder=encoder, sha256=sha256)


def render_queue(model_set: str) -> str:
    """The Celery queue that the workers of one model set consume."""
    return RENDER_QUEUE.format(model_set=model_set)


def object_uri(bucket: str, key: str) -> str:
    """`s3://bucket/key`: how an object is named to users (`ObjectStore.uri`, `ipab results` without a client)."""
    return f"s3://{bucket}/{key}"
