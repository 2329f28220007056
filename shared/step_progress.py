"""A running job's denoising step, for `GET /v1/jobs/{id}`: best effort, in Redis, never in SQL.

The worker writes `{"step": N, "steps": M}` under the job's key at most every
`PROGRESS_EVERY_S` (an UPDATE per step would cost SQL more than the step costs a GPU) with a
TTL of one lease, so a worker that died leaves no stale progress behind for long. Losing it
(Redis down or flushed) loses only the display.
"""

from __future__ import annotations

import json
from typing import Final

import redis

from shared import keys

PROGRESS_EVERY_S: Final = 0.5


def progress_key(prefix: str, job_id: str) -> str:
    """Where a running job's step is kept."""
    return prefix + keys.PROGRESS_KEY.format(job_id=job_id)


def record_steps(redis_client: redis.Redis, *, prefix: str, steps: dict[str, tuple[int, int]], ttl_s: float) -> None:
    """Note (step done, steps in all) for each job id; Redis errors are ignored (a display only)."""
    try:
        pipe = redis_client.pipeline(transaction=False)
        for job_id, (step, total) in steps.items():
            pipe.set(progress_key(prefix, job_id), json.dumps({"step": step, "steps": total}), px=int(ttl_s * 1000))
        pipe.execute()
    except redis.RedisError:
        pass


def read_step(redis_client: redis.Redis, *, prefix: str, job_id: str) -> dict[str, int] | None:
    """The last noted {"step", "steps"} of a running job, or None."""
    try:
        raw = redis_client.get(progress_key(prefix, job_id))
    except redis.RedisError:
        return None
    if raw is None:
        return None
    value = json.loads(raw)
    return {"step": int(value["step"]), "steps": int(value["steps"])}
