"""What every request shares, built once per process: settings, SQL sessions, object store, Redis.

Routes get it, and the caller, through FastAPI dependencies (`get_context`, `get_caller`).
"""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from typing import Annotated, Final

import redis
from fastapi import Depends, Header, Request
from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool

from scheduler.api.batch_processes import BatchProcesses
from scheduler.api.caches import (
    AUTH_CACHE_S,
    FORECAST_CACHE_S,
    KNOWN_KEY_S,
    REFERENCE_CACHE_S,
    ExpiringCache,
)
from scheduler.api.heavy_gate import HeavyGate
from scheduler.api.problems import ApiProblem
from scheduler.api.rate_limit import RateLimiter
from scheduler.api.tallies import Tallies
from scheduler.submission.references import ReferenceFile
from scheduler.submission.submit import resolve_model_set_name
from scheduler.tenants import Caller, find_caller, hash_key, reserved_tenant_hint
from scheduler.webhooks.resolver import Resolver
from shared.db import ensure_database, make_engine, make_session_factory
from shared.dispatch.position import BacklogSnapshots, Forecast
from shared.errors import IpabError
from shared.jobs import transaction
from shared.redis_conn import API, connect_redis
from shared.settings import Settings
from shared.storage import ObjectStore

BEARER: Final = re.compile(r"Bearer[ \t]+(\S{1,512})", re.IGNORECASE)
AUTH_HINT: Final = "send `Authorization: Bearer <key>`; `ipab keys create --tenant NAME` makes a key"
ADMIN_HINT: Final = "`ipab keys create --tenant NAME --admin` makes one"


@dataclass
class ApiContext:
    """The process-wide parts of the API; `redis` is one client (a connection pool) for every request."""

    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    store: ObjectStore
    redis: redis.Redis
    _model_set: list[str] = field(default_factory=list)
    # key sha256 -> caller: a revoked key works on for at most `ttl_s` (AUTH_CACHE_S).
    callers: ExpiringCache[str, Caller] = field(default_factory=lambda: ExpiringCache(ttl_s=AUTH_CACHE_S))
    known_keys: ExpiringCache[str, bool] = field(default_factory=lambda: ExpiringCache(ttl_s=KNOWN_KEY_S))
    # /readyz's last checks (scheduler/api/routes/health.py): (when made, monotonic s; results),
    # and the lock of the one thread making them.
    readiness: tuple[float, dict[str, str]] | None = None
    readiness_lock: threading.Lock = field(default_factory=threading.Lock)
    # (tenant, sha256) -> the stored reference image: uploaded references never change.
    references: ExpiringCache[tuple[str, str], ReferenceFile] = field(
        default_factory=lambda: ExpiringCache(ttl_s=REFERENCE_CACHE_S)
    )
    # ("job" or "batch", id) -> where it stands in the queue, recomputed at most once per FORECAST_CACHE_S.
    forecasts: ExpiringCache[tuple[str, str], Forecast] = field(
        default_factory=lambda: ExpiringCache(ttl_s=FORECAST_CACHE_S)
    )
    # Webhook hosts are looked up in threads of their own, a few per tenant (see its module).
    webhook_resolver: Resolver = field(default_factory=Resolver)
    # Each tenant's request rate (IPAB_API_RATE_PER_S), checked with its key on every request.
    limiter: RateLimiter = field(init=False)
    # One large-body request (a batch, an upload, a plan) in flight per tenant (see its module).
    heavy: HeavyGate = field(init=False)
    # Large batch bodies are handled in child processes, started at the first (see its module).
    batch_processes: BatchProcesses = field(init=False)
    # Every queue position's backlog counts of all tenants, read at most once a second (see its module).
    backlog: BacklogSnapshots = field(init=False)
    # Batches' counts per status, each read again only after COST_FACTOR times its count's cost (see its module).
    tallies: Tallies = field(init=False)

    def __post_init__(self) -> None:
        self.limiter = RateLimiter(self.settings)
        self.heavy = HeavyGate(self.limiter)
        self.batch_processes = BatchProcesses(self.settings)
        self.backlog = BacklogSnapshots(self.sessions)
        self.tallies = Tallies(self.sessions)

    @classmethod
    def build(cls, settings: Settings, *, migrate: bool = True) -> ApiContext:
        """Migrate the database (unless `migrate` is False: a batch process's parent did), then connect
        to it, the object store and Redis (once)."""
        if migrate:
            ensure_database(settings.database_url)
        engine = make_engine(settings.database_url)
        client = connect_redis(settings.redis_url, profile=API)
        store = ObjectStore.from_settings(settings)
        return cls(settings, engine, make_session_factory(engine), store, client)

    def model_set(self) -> str:
        """The model set API jobs run on (IPAB_MODEL_SET's name); 503 when none is configured."""
        if not self._model_set:
            try:
                self._model_set.append(resolve_model_set_name(None, self.settings))
            except IpabError as e:
                raise ApiProblem(503, f"this API server cannot take jobs: {e}", kind="no-model-set") from e
        return self._model_set[0]

    def close(self) -> None:
        """Stop the batch processes; release the connections."""
        self.batch_processes.close()
        self.redis.close()
        self.engine.dispose()
        self.webhook_resolver.close()


async def get_context(request: Request) -> ApiContext:
    """The app's context (a dependency; `async`, or FastAPI would run it in a thread for every request)."""
    ctx: ApiContext = request.app.state.ctx
    return ctx


def _unauthorized(detail: str) -> ApiProblem:
    return ApiProblem(401, detail, headers={"WWW-Authenticate": "Bearer"}, kind="unauthorized")


def _lookup(ctx: ApiContext, key: str) -> Caller | None:
    with transaction(ctx.sessions) as session:
        return find_caller(session=session, key=key)


async def _caller_of(ctx: ApiContext, key: str, client: str) -> Caller | None:
    """The key's caller, from the cache when it was found valid less than AUTH_CACHE_S ago.

    Only valid keys are cached: an unknown key is looked up every time, so a key made a
    moment ago works at once and guesses cannot fill the cache. Lookups are limited per client
    address (`RateLimiter.check_key_lookup`), and only unknown keys use them up: guesses cannot keep
    the database busy either. A key found valid within KNOWN_KEY_S is looked up outside that limit,
    so a tenant behind the same address as a client sending guesses is not refused with it.
    """
    key_sha256 = hash_key(key)
    caller = ctx.callers.get(key_sha256)
    if caller is None:
        known = ctx.known_keys.get(key_sha256) is not None  # found valid within KNOWN_KEY_S: not limited
        if not known:
            await ctx.limiter.check_key_lookup(client)
        caller = await run_in_threadpool(_lookup, ctx, key)
        if caller is None:
            ctx.known_keys.discard(key_sha256)  # revoked meanwhile
        else:
            ctx.callers.put(key_sha256, caller)
            ctx.known_keys.put(key_sha256, True)
            if not known:
                await ctx.limiter.refund_key_lookup(client)
    return caller


async def get_caller(
    request: Request,
    ctx: Annotated[ApiContext, Depends(get_context)],
    authorization: Annotated[str | None, Header()] = None,
) -> Caller:
    """The tenant behind the request's Bearer key; 401 for a missing, malformed, unknown or revoked key;
    429 past the tenant's request rate (every authenticated route goes through here).

    403 for a key of a reserved tenant (made before the name was reserved): `default` would
    see and cancel what the operator submits from the CLI.
    """
    if authorization is None:
        raise _unauthorized(f"no Authorization header; {AUTH_HINT}")
    match = BEARER.fullmatch(authorization.strip())
    if match is None:
        raise _unauthorized(f"the Authorization header is not `Bearer <key>`; {AUTH_HINT}")
    caller = await _caller_of(ctx, match.group(1), request.client.host if request.client else "unknown")
    if caller is None:
        raise _unauthorized("the API key is unknown or revoked")
    reserved = reserved_tenant_hint(caller.tenant)
    if reserved is not None:
        raise ApiProblem(403, reserved, kind="forbidden")
    await ctx.limiter.check(caller.tenant, f"{request.method} {getattr(request.scope.get('route'), 'path', '')}")
    return caller


Context = Annotated[ApiContext, Depends(get_context)]
CallerDep = Annotated[Caller, Depends(get_caller)]


async def get_admin(caller: CallerDep) -> Caller:
    """The caller, when its key is an admin key; 403 otherwise (plans act for every tenant)."""
    if not caller.admin:
        raise ApiProblem(403, f"this route needs an admin key; {ADMIN_HINT}", kind="forbidden")
    return caller


AdminDep = Annotated[Caller, Depends(get_admin)]
