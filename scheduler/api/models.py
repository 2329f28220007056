"""The API's contract as pydantic models: what OpenAPI shows and what responses hold.

Request bodies are validated by the manifest's validator (one validator for every entry
point); the request models here document them for OpenAPI and clients.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from shared.dispatch.policy import Lane
from shared.spec import Scheduler


class JobIn(BaseModel):
    """One job: the fields of a manifest row, with `references` as ids from POST /v1/references."""

    model_config = ConfigDict(extra="forbid")

    references: list[str] = Field(min_length=1, max_length=8, description="reference ids (sha256)")
    prompt: str
    negative_prompt: str | None = None
    seed: int | None = Field(default=None, ge=0, description="drawn and stored when absent")
    width: int | None = None
    height: int | None = None
    steps: int | None = None
    guidance_scale: float | None = None
    ip_adapter_scale: float | str | dict[str, Any] | None = None
    scheduler: Scheduler | None = None
    lane: Lane | None = Field(
        default=None, description="the share of the fleet it waits in (default: interactive for a single job)"
    )
    id: str | None = Field(default=None, description="your own key for the job, unique per tenant")
    webhook: dict[str, Any] | None = Field(
        default=None, description="{url, events}: where to POST this job's events (all job events by default)"
    )
    expires_after: str | int | None = Field(
        default=None,
        description="how long its image is kept once it finishes: 1h, 7d, 30d (1h to 3650d), seconds, or never; "
        "default: the tenant's retention, else the fleet's",
    )


class JobCreated(BaseModel):
    """202 to POST /v1/jobs."""

    id: str
    status: str
    client_id: str | None = None


class JobMetrics(BaseModel):
    """What a job used (`metrics`, as Replicate names it): what is billed, what was lost, and the times."""

    gpu_seconds: float | None = Field(
        default=None, description="device seconds of the attempt that ended it (its share of a batched call); billed"
    )
    lost_gpu_seconds: float = Field(default=0.0, description="of attempts killed, taken over or failed; not billed")
    queue_seconds: float | None = Field(default=None, description="from submission to the start of its last attempt")
    total_seconds: float | None = Field(default=None, description="from submission to its end")
    images: int = 0
    steps: int | None = Field(default=None, description="denoising steps run (fewer for a canceled job)")
    pixel_steps: int | None = Field(default=None, description="width x height x steps: the same on every card")
    model_set: str | None = Field(default=None, description="its batch's model set")
    device: str | None = Field(default=None, description="the device that rendered it (a succeeded job's); else null")


class JobOut(BaseModel):
    """A job as GET /v1/jobs/{id} shows it."""

    id: str
    client_id: str | None
    batch_id: str
    status: str
    queue_position: int | None
    eta_s: float | None = None
    progress: dict[str, int] | None = None  # while running: {"step": denoising steps done, "steps": in all}
    lane: str | None = None
    attempts: int
    error: dict[str, Any] | None
    metrics: JobMetrics | None = None
    params: dict[str, Any]
    references: list[str]
    output_sha256: str | None
    output_bytes: int | None
    timings: dict[str, Any] = Field(
        description=(
            "queued_at, started_at, finished_at (ISO 8601 UTC); denoise_s (this job's share of its denoising"
            " call: the call's time divided by the jobs in it), upload_s (seconds)"
        )
    )
    expires_at: str | None = Field(
        default=None, description="when its image expires (ISO 8601 UTC); null: kept for ever, or not finished"
    )
    data_removed_at: str | None = Field(
        default=None, description="when its image was removed (expired or deleted); null while it is kept"
    )
    image_url: str | None
    image_url_expires_s: float | None


class JobDeleted(BaseModel):
    """202 to DELETE /v1/jobs/{id} and /v1/batches/{id}: the deletion is under way (then: 404)."""

    id: str
    status: Literal["deleting"]


class TenantRetention(BaseModel):
    """A tenant's default retention of its images, as GET and PUT /v1/tenants/{name}/retention show it."""

    tenant: str
    expires_after: str | None = Field(description="its own (7d, 30d, never...); null: the fleet's")
    fleet_expires_after: str = Field(description="the fleet's (IPAB_RETENTION_OUTPUTS_S); never when unset")


class BatchCreated(BaseModel):
    """202 to POST /v1/batches."""

    id: str
    status: str
    added: int
    invalid: list[dict[str, Any]] = Field(description="the first 100 problems of the rows skipped (skip_invalid)")
    invalid_count: int = Field(description="how many problems the skipped rows had in all")


class BatchOut(BaseModel):
    """A batch: counts per status, progress (0 to 1), ETA in seconds."""

    id: str
    status: str
    model_set: str
    created_at: str | None
    counts: dict[str, int]
    total: int
    progress: float
    eta_s: float | None
    paused: bool = False
    queue_position: int | None = None  # of its last queued job, by the lane policy
    expires_at: str | None = None  # when its last image expires, once every job has an expiry


class PlanOut(BaseModel):
    """A nightly plan as GET /v1/plans/{name} shows it; times in the plan's zone, ISO 8601 with offset."""

    name: str
    state: Literal["enabled", "paused"]
    schedule: str
    timezone: str
    manifest: str
    model_set: str
    model_set_file: str | None = Field(
        default=None, description="the model-set toml a plan file named, whose rules each slot reads (none by API)"
    )
    tenant: str
    lane: str
    set: dict[str, Any]
    catch_up: str
    overlap: str
    webhook: str | None
    source: str
    next_slots: list[str]


class PlanApplied(PlanOut):
    """200 (or 201, created) to POST /v1/plans."""

    change: Literal["created", "updated", "unchanged"]
    webhook_secret: str | None = Field(
        default=None, description="the plan's tenant's webhook signing secret, when this created the tenant (once)"
    )
    warnings: list[str] = Field(
        default_factory=list,
        description="applied, but: e.g. the model set's [defaults] and [limits] cannot be read by this scheduler",
    )


class PlanToggled(PlanOut):
    """200 to POST /v1/plans/{name}/pause|resume; `changed` is false when it was so already."""

    changed: bool


class PlanListed(BaseModel):
    """A plan in GET /v1/plans: its next slot and its newest slot with that batch's counts."""

    name: str
    state: str
    schedule: str
    timezone: str
    next_slot: str
    last_slot: str | None
    last_status: str | None
    last: str | None = Field(description="the newest slot's job counts, or why it made no batch")
    last_counts: dict[str, int] | None


class PlanSlotOut(BaseModel):
    """One slot in GET /v1/plans/{name}/history: its batch and counts, or why it made none."""

    slot: str
    kind: Literal["scheduled", "manual"]
    status: str
    batch_id: str | None
    batch: str | None
    counts: dict[str, int] | None
    reason: str | None


class PlanRun(BaseModel):
    """202 to POST /v1/plans/{name}/run: the batch of the extra slot."""

    status: str
    batch_id: str
    batch_name: str
    added: int


class PlanDeleted(BaseModel):
    """200 to DELETE /v1/plans/{name}: its slot history went with it; its batches stay."""

    name: str
    deleted_slots: int


def openapi_body(model: type[BaseModel]) -> dict[str, Any]:
    """`openapi_extra` documenting a JSON body that the route reads by hand."""
    schema = model.model_json_schema()
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}
