"""One typed settings object, the only reader of `IPAB_*` environment variables and `.env`.

Bad values stop start-up with a message that names the variable. Standard AWS variables
(`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`) are read by boto3.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared import setting_checks as checks
from shared.dispatch.policy import DEFAULT_LANE_WEIGHTS, LANES
from shared.errors import SettingsError
from shared.redact import mask_text

ENV_PREFIX = "IPAB_"
# A list setting written as a JSON list, or as items joined by commas or colons.
TextList = Annotated[list[str], NoDecode, BeforeValidator(checks.split_list)]
PathList = Annotated[list[Path], NoDecode, BeforeValidator(checks.split_list)]
# A retention written as people write it (`7d`, `12h`, `1y`, seconds), or `never` (None).
Retention = Annotated[int | None, BeforeValidator(checks.parse_retention)]
# Weights written as a JSON object, or as `name=weight` items joined by commas.
Weights = Annotated[dict[str, float], NoDecode, BeforeValidator(checks.split_weights)]
# Durations that may be 0; every other `*_s` setting must be greater than 0.
ZERO_ALLOWED_S = frozenset({"requeue_grace_s", "dispatch_horizon_s"})
MIN_IDEMPOTENCY_TTL_S = 24 * 3600.0
# Settings whose values are secrets: never shown, even when refused.
SECRET_FIELDS = frozenset({"api_key", "metrics_token"})
# Smallest value of each whole-number setting.
MINIMUM_COUNTS = {"max_attempts": 1, "transient_retries": 0, "cache_lru_bytes": 0, "batch_wait_ms": 0}
MINIMUM_COUNTS["metrics_port"] = 0  # 0 turns a worker's /metrics off
MINIMUM_COUNTS["api_metrics_port"] = 0  # 0: the API serves /metrics on no port of its own
MINIMUM_COUNTS["api_batch_processes"] = 0  # 0: batches are parsed in the API process itself
MINIMUM_COUNTS["api_batch_process_min_bytes"] = 0  # 0: every batch goes to a batch process
MAX_PORT = 65535  # the largest TCP port
# Without IPAB_DISPATCH_DEPTH, the queue is kept at least this deep, and at least one batch deep.
DEFAULT_DISPATCH_DEPTH = 4


class Settings(BaseSettings):
    """All of ipab's configuration. Build it once per process with `load_settings()`."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore")

    database_url: str = "sqlite:///ipab.db"
    redis_url: str = "redis://127.0.0.1:6379/0"
    redis_prefix: str = "ipab:"
    s3_endpoint_url: str | None = None
    s3_bucket: str = "ipab"
    s3_region: str = "us-east-1"

    model_set: Path | None = None
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = "auto"
    compile: bool = False
    # The fast path (worker/pipeline.py): fused q/k/v projections, channels_last memory format.
    fuse_qkv: bool = False
    channels_last: bool = False
    # Micro-batching (worker/batching.py): up to `batch_size` compatible queued jobs share one
    # pipeline call; a worker waits at most `batch_wait_ms` for a batch to fill.
    batch_size: int = 1
    batch_wait_ms: int = 50

    # Local reference images may only be read from under these folders (empty: the working
    # dir and the manifest's own folder); s3:// references only from these buckets (empty:
    # IPAB_S3_BUCKET alone).
    reference_roots: PathList = []
    reference_buckets: TextList = []

    # Embedding cache.
    cache_lru_bytes: int = 256 * 1024 * 1024
    cache_redis_ttl_s: int = 7 * 24 * 3600
    cache_lock_ttl_s: float = 60.0
    cache_wait_s: float = 120.0
    # Where the image encoder lives: on the render device; on the CPU (encodes there, the GPU
    # never holds it); or "swap": in host memory, moved to the render GPU only for an encode.
    encoder_placement: Literal["device", "cpu", "swap"] = "device"

    # Reliability.
    lease_s: float = 60.0
    heartbeat_s: float = 2.0  # also how soon a canceled running job notices (one UPDATE per beat)
    max_attempts: int = 3
    soft_time_limit_s: float = 1800.0
    hard_time_limit_s: float = 1900.0
    visibility_timeout_s: float = 3600.0
    reconcile_interval_s: float = 30.0
    # Where the reconciler runs: in every worker (default; a Redis lock lets one of them work),
    # or, with this false, only in a dedicated `ipab reconcile --loop` process.
    reconcile_in_workers: bool = True
    consumer_stall_s: float = 60.0  # messages waiting this long untaken: restart the worker
    requeue_grace_s: float = 10.0
    retry_base_s: float = 0.5
    retry_max_s: float = 30.0
    transient_retries: int = 8

    # Lanes and fair share (shared/dispatch): which queued job starts next. The dispatcher keeps
    # each model set's Redis queue `dispatch_depth` messages deep, fed in policy order.
    lane_weights: Weights = dict(DEFAULT_LANE_WEIGHTS)  # interactive, scheduled, bulk
    tenant_weights: Weights = {}  # tenants not named weigh 1
    dispatch_depth: int = (
        DEFAULT_DISPATCH_DEPTH  # messages waiting in Redis per model set; more: throughput, fewer: priority
    )
    # A fleet that takes more than `dispatch_depth` messages in this long gets a deeper queue, what
    # it takes in this long (its rate over the last second): a dispatch round then moves many jobs,
    # not two. 0: exactly `dispatch_depth`. At 0.25 s, 4 fast workers' rounds moved about a dozen
    # jobs each; at 0.5 s two dozen, and the central CPU per job fell by a tenth (bench.control_plane).
    dispatch_horizon_s: float = 0.5
    dispatch_rescan_s: float = 2.0  # the backlog is re-read from SQL at least this often
    dispatch_lock_s: float = 5.0  # a dead dispatcher's lock lapses after this long

    # Data lifecycle (shared/retention.py, shared/janitor/): unset, everything is kept for ever.
    retention_outputs_s: Retention = None  # a job's objects, counted from when it finishes (tenants, jobs may say)
    retention_metadata_s: Retention = None  # a job's row, counted from the expiry of its objects
    janitor_interval_s: float = 60.0  # how often the janitor looks for expired data (a deletion wakes it)
    janitor_batch: int = 500  # jobs (or references) one janitor step handles: one S3 call, short transactions

    # The HTTP API (`ipab api`) and its webhooks.
    api_max_queued_jobs: int = 100_000  # per tenant; a POST that would pass it gets 429
    api_max_body_bytes: int = 64 * 1024 * 1024  # per request; past it, 413
    api_max_batch_rows: int = 100_000  # rows per POST /v1/batches; past it, 413 before the rest is read
    # Batch bodies of at least `api_batch_process_min_bytes` are parsed, validated and submitted in
    # one of `api_batch_processes` child processes (scheduler/api/batch_processes.py; 0: in the API's).
    api_batch_processes: int = 2
    api_batch_process_min_bytes: int = 1024 * 1024
    # Per-tenant request rate (scheduler/api/rate_limit.py): a token bucket in Redis, refilled at
    # `api_rate_per_s` tokens a second (0: no limit) and holding at most `api_rate_burst`; past it, 429.
    api_rate_per_s: float = 50.0
    api_rate_burst: int = 100
    # Per-tenant bytes of large bodies (batches, uploads, plans), another bucket of the same kind:
    # `api_body_bytes_per_s` (0: no limit), holding at most `api_body_burst_bytes` (unset: twice
    # `api_max_body_bytes`, so two of the largest bodies go at once); past it, 429 before the body is read.
    api_body_bytes_per_s: float = 16 * 1024 * 1024
    api_body_burst_bytes: int = 2 * 64 * 1024 * 1024
    # Per client address, lookups in SQL of API keys not in the process's cache (unknown keys, or
    # valid ones not seen for a while): another bucket of the same kind (0: no limit); past it, 429.
    api_key_lookups_per_s: float = 2.0
    api_key_lookup_burst: int = 30
    api_image_url_expiry_s: float = 3600.0  # presigned `image_url`s
    idempotency_ttl_s: float = 48 * 3600.0  # Idempotency-Key records are kept this long (>= 24 h)
    webhook_allow_private: bool = False  # deliver to loopback/private addresses (tests, one host)
    webhook_poll_s: float = 1.0  # the dispatcher's scan interval
    webhook_timeout_s: float = 5.0  # one delivery attempt's connect and each read; short: a thread waits it out
    webhook_dns_timeout_s: float = 2.0  # a webhook host's look-up, at submission (else 422) and at delivery
    webhook_retry_base_s: float = 5.0  # backoff: base * 2**(attempt-1), capped at the max
    webhook_retry_max_s: float = 3600.0
    webhook_give_up_s: float = 24 * 3600.0  # after this long undelivered, a message is marked failed
    api_key: str | None = None  # the key `ipab submit/status/results --api URL` sends

    # Operations: Prometheus, Celery's own monitoring, log lines.
    metrics_port: int = 0  # a worker serves /metrics on this port (0: off)
    # The API's /metrics names tenants: it is never on the API's port without a key. It is served
    # on a port of its own (`api_metrics_port`; 0: none), and/or on the API's port to the bearer
    # of `metrics_token` (unset: not there at all).
    api_metrics_port: int = 0
    metrics_token: str | None = None
    celery_events: bool = False  # task events, for Flower (3 Redis PUBLISH per job); `celery inspect` works without
    log_format: Literal["text", "json"] = "text"  # json: one object per line, job fields on job lines

    @field_validator("*", mode="after")
    @classmethod
    def _check_units(cls, value: Any, info: ValidationInfo) -> Any:
        # Units in names: every `*_s` is a finite duration, every count has a minimum.
        name = info.field_name or ""
        if name.endswith("_per_s") and isinstance(value, int | float):  # a rate, not a duration
            return checks.check_rate(float(value))
        if name.endswith("_s") and isinstance(value, int | float):
            checks.check_seconds(float(value), allow_zero=name in ZERO_ALLOWED_S)
            return value
        if isinstance(value, int) and not isinstance(value, bool):
            return checks.check_count(value, minimum=MINIMUM_COUNTS.get(name, 1))
        return value

    _database_url = field_validator("database_url")(checks.check_database_url)
    _redis_url = field_validator("redis_url")(checks.check_redis_url)
    _endpoint_url = field_validator("s3_endpoint_url")(checks.check_endpoint_url)
    _bucket = field_validator("s3_bucket")(checks.check_bucket_name)
    _device = field_validator("device")(checks.check_device)
    _prefix = field_validator("redis_prefix")(checks.check_key_prefix)
    _region = field_validator("s3_region")(checks.check_region)
    _roots = field_validator("reference_roots")(checks.check_folders)
    _api_key = field_validator("api_key")(checks.check_token)
    _metrics_token = field_validator("metrics_token")(checks.check_token)
    _model_set = field_validator("model_set")(checks.check_model_set_path)
    _tenant_weights = field_validator("tenant_weights")(checks.check_weights)

    @field_validator("metrics_port", "api_metrics_port")
    @classmethod
    def _check_port(cls, port: int) -> int:
        if port > MAX_PORT:
            raise ValueError(f"is not a TCP port (0: no metrics port, else 1..{MAX_PORT})")
        return port

    @field_validator("lane_weights")
    @classmethod
    def _check_lanes(cls, weights: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(weights) - set(LANES))
        if unknown:
            raise ValueError(f"names {', '.join(unknown)}; the lanes are {', '.join(LANES)}")
        return {**DEFAULT_LANE_WEIGHTS, **checks.check_weights(weights)}

    @field_validator("reference_buckets")
    @classmethod
    def _check_buckets(cls, names: list[str]) -> list[str]:
        for name in names:
            try:
                checks.check_bucket_name(name)
            except ValueError as e:
                raise ValueError(f"holds {name!r}, which {e}") from None
        return names

    @model_validator(mode="after")
    def _check_limits(self) -> Settings:
        # A dispatched job whose id stays in Redis's `queued` set is handed back by the reconciler after
        # IPAB_VISIBILITY_TIMEOUT_S (shared/reconcile.py): longer than any job may run, so never while a
        # worker may still hold its message.
        if not 0 < self.soft_time_limit_s < self.hard_time_limit_s < self.visibility_timeout_s:
            raise ValueError(
                "need 0 < IPAB_SOFT_TIME_LIMIT_S < IPAB_HARD_TIME_LIMIT_S < IPAB_VISIBILITY_TIMEOUT_S, got "
                f"{self.soft_time_limit_s}, {self.hard_time_limit_s}, {self.visibility_timeout_s}; "
                "set them in this order (defaults 1800, 1900, 3600)"
            )
        if not 0 < self.heartbeat_s < self.lease_s:
            raise ValueError(
                f"need 0 < IPAB_HEARTBEAT_S < IPAB_LEASE_S, got {self.heartbeat_s} and {self.lease_s}; "
                "lower IPAB_HEARTBEAT_S or raise IPAB_LEASE_S (defaults 2 and 60)"
            )
        if self.idempotency_ttl_s < MIN_IDEMPOTENCY_TTL_S:
            raise ValueError(f"IPAB_IDEMPOTENCY_TTL_S must be at least 86400 (24 h), got {self.idempotency_ttl_s}")
        if "api_body_burst_bytes" not in self.model_fields_set:
            self.api_body_burst_bytes = 2 * self.api_max_body_bytes
        if self.api_body_bytes_per_s > 0 and self.api_body_burst_bytes < self.api_max_body_bytes:
            raise ValueError(
                f"IPAB_API_BODY_BURST_BYTES ({self.api_body_burst_bytes}) is less than IPAB_API_MAX_BODY_BYTES "
                f"({self.api_max_body_bytes}): a body of the largest size could never be sent; raise it to at "
                "least that, or leave it unset (twice IPAB_API_MAX_BODY_BYTES)"
            )
        if "dispatch_depth" not in self.model_fields_set:
            # A worker can only batch the jobs waiting in Redis: keep at least one batch there.
            self.dispatch_depth = max(DEFAULT_DISPATCH_DEPTH, self.batch_size)
        return self


def require_model_set(settings: Settings) -> Path:
    """The worker's model-set.toml; a worker without one cannot start."""
    if settings.model_set is None:
        raise SettingsError(
            "IPAB_MODEL_SET is not set: point it at a model-set.toml (`ipab models download DIR` writes one; "
            "in the repository, `python -m devkit synth DIR` writes a tiny one)"
        )
    return settings.model_set


def _fix(field: str) -> str:
    default = Settings.model_fields[field].default
    if default is None or default == []:
        return "fix it, or unset it (README: Configuration)"
    return f"fix it, or unset it for the default {default}"


def _problem(err: Any) -> str:
    """One pydantic error as `IPAB_NAME='value' <what is wrong>; <the fix>`, credentials masked."""
    reason = str(err["msg"]).removeprefix("Value error, ")
    if not err["loc"]:  # a check across settings names its variables itself
        return reason
    field = str(err["loc"][0])
    shown = repr(err.get("input")) if field not in SECRET_FIELDS else "'***'"
    shown = shown if len(shown) <= 120 else shown[:117] + "..."
    return f"{ENV_PREFIX}{field.upper()}={mask_text(shown)} {reason}; {_fix(field)}"


def load_settings() -> Settings:
    """Read the settings; a bad value raises `SettingsError`: one line naming each bad variable."""
    try:
        return Settings()
    except ValidationError as e:
        problems = [_problem(err) for err in e.errors()]
        raise SettingsError("invalid settings: " + " | ".join(problems)) from e
