"""Per-tenant request rate limits: a token bucket per tenant in Redis, checked with every key.

Every authenticated request takes tokens from its tenant's bucket, which holds at most
IPAB_API_RATE_BURST and refills at IPAB_API_RATE_PER_S. One Lua script reads, refills and
takes in one round trip, atomically, on Redis's own clock, so every API process (on any
host) shares one bucket per tenant. A request that finds too few tokens takes none and is
refused with 429 and `Retry-After`: the seconds until enough are back. Routes that cost the
server many times a lookup cost as many tokens (`ROUTE_COSTS`), so a tenant cannot make
the server work harder just by choosing them.

A refusal is answered after its wait, at least REFUSAL_MIN_DELAY_S and at most REFUSAL_DELAY_S, and
a random part of REFUSAL_SPREAD_S more (so a flood's refusals do not come due in one burst):
it costs the event loop nothing meanwhile, and a client that ignores Retry-After and asks again
at once gets one refusal per connection per that delay, instead of making the server answer a
thousand a second (measured: 16 such connections, answered at once, slowed another tenant's
requests more than the unlimited flood of galleries they replaced; answered after their wait
alone, which is short when a gallery's 50 tokens are nearly back, they still got 60 a second).
A refused tenant is remembered in process until its tokens are due back, so those refusals cost
no Redis call either.

Large bodies (batches, uploads, plans) are paid for in bytes too, from a second bucket per
tenant (IPAB_API_BODY_BYTES_PER_S, IPAB_API_BODY_BURST_BYTES): reading, spilling and parsing a
body costs the server by its size, and one token per request let a tenant that ignores every
answer send 140 MB/s of 32 MiB invalid batches, read on the event loop that serves every tenant
(bench/two_tenants.py). A declared body (Content-Length) is paid for before any of it is read,
and refused, its body unread and its connection closed, when the bucket cannot pay; a streamed
one (chunked) is paid for once read, and the bucket may then go into debt, which the tenant's
next bodies wait out.

A limit must not become an outage: when Redis cannot be reached, every request is served
(fail open) and one warning is logged; for `OUTAGE_PAUSE_S` after a failure the limiter does
not ask Redis at all, so no request waits out a timeout. The client is asyncio's: the check
runs on the event loop and never blocks it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any, Final

import redis
import redis.asyncio

from scheduler.api.problems import ApiProblem
from shared.keys import BODY_BUCKET_KEY, KEY_LOOKUP_BUCKET_KEY, RATE_BUCKET_KEY
from shared.redis_conn import LIMITER, connect_async_redis
from shared.settings import Settings

log = logging.getLogger(__name__)

# Tokens per request by method and route template; any other route costs 1. Server CPU measured
# on one `ipab api` process (bench: sequential requests, SQLite): a GET of a job 4 ms; on a batch
# of 20 jobs, its gallery 47 ms (a card per job, thumbnails read from S3) and its results 9 ms (a
# line per job, a presigned URL each), both growing with the batch; an upload 12 ms (3 ms for an
# image refused from its header); a POST of a 20-row batch 17 ms; a lone POST of a job 11 ms
# (concurrent ones are written in groups, for less). One price must cover large requests too: at
# the default rate a tenant gets a gallery a second (a page for a person: plenty), 5 results
# streams, 16 uploads or 12 batches. Priced at one token, image bombs refused from their headers
# were the cheapest way for a hostile tenant to keep the API's event loop busy (bench/two_tenants.py).
# A refusal costs 0.6 ms (1.6 ms before refusals were remembered in process).
ROUTE_COSTS: Final = {
    "GET /v1/batches/{batch_id}/gallery": 50,
    "GET /v1/batches/{batch_id}/results": 10,
    "POST /v1/references": 3,
    "POST /v1/batches": 4,
    "POST /v1/plans": 4,
    "POST /v1/jobs": 2,
}
OUTAGE_PAUSE_S: Final = 5.0
REFUSAL_DELAY_S: Final = 1.0
REFUSAL_MIN_DELAY_S: Final = 0.5  # a refusal whose tokens are back sooner waits this long all the same
REFUSAL_SPREAD_S: Final = 0.5  # and then up to this much more, at random (`refusal_delay_s`)
MAX_REMEMBERED: Final = 10_000  # refusals remembered in process (tenant, cost) before the expired are dropped
# KEYS[1] the bucket (hash: tokens, at_ms); ARGV rate (tokens/s), burst, cost. First the bucket as
# it stands now: `tokens` refilled since `at_ms` on Redis's clock, at most `burst`.
_REFILLED_LUA: Final = """
local rate, burst, cost = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local clock = redis.call('TIME')
local now_ms = tonumber(clock[1]) * 1000 + math.floor(tonumber(clock[2]) / 1000)
local state = redis.call('HMGET', KEYS[1], 'tokens', 'at_ms')
local tokens = tonumber(state[1]) or burst
local at_ms = tonumber(state[2]) or now_ms
tokens = math.min(burst, tokens + math.max(0, now_ms - at_ms) * rate / 1000)
"""
# Returns {1, 0} when taken, else {0, milliseconds until `cost` tokens are back}. A refusal writes nothing.
TAKE_LUA: Final = (
    _REFILLED_LUA
    + """
if tokens < cost then
  return {0, math.ceil((cost - tokens) * 1000 / rate)}
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens - cost), 'at_ms', tostring(now_ms))
redis.call('PEXPIRE', KEYS[1], math.ceil(burst * 1000 / rate) + 1000)
return {1, 0}
"""
)
# The same bucket, paying `cost` whatever it holds (down to -burst: a debt the next takes wait out).
DEBIT_LUA: Final = (
    _REFILLED_LUA
    + """
redis.call('HSET', KEYS[1], 'tokens', tostring(math.max(-burst, tokens - cost)), 'at_ms', tostring(now_ms))
redis.call('PEXPIRE', KEYS[1], math.ceil(2 * burst * 1000 / rate) + 1000)
return 1
"""
)
MIB: Final = 1024 * 1024


def refusal_delay_s(wait_s: float, spread: float | None = None) -> float:
    """How long a refusal waits before it is answered: its wait, within [REFUSAL_MIN_DELAY_S,
    REFUSAL_DELAY_S], then `spread` (0 to 1, at random when None) of REFUSAL_SPREAD_S more.

    The spread keeps a flood's connections apart. Refusals that wait for the same tokens come due
    at the same moment; answered together, their clients asked again together, were refused
    together, and the herd stayed in step: measured (bench/two_tenants.py), 15 refusals and 15 new
    requests every second in one burst of the event loop, which another tenant's request that
    arrived then waited out (its p99 1.4x of alone beside the flood alone).
    """
    fraction = random.random() if spread is None else spread
    return min(max(wait_s, REFUSAL_MIN_DELAY_S), REFUSAL_DELAY_S) + fraction * REFUSAL_SPREAD_S


async def _refuse_while(wait_s: float | None, who: str, limit: str, *, close: bool = False) -> None:
    """Nothing when `wait_s` is None; else, after `refusal_delay_s`, 429 naming `who` (the tenant,
    or the client) and `limit` (and closing the connection: `close`)."""
    if wait_s is None:
        return
    await asyncio.sleep(refusal_delay_s(wait_s))
    retry_s = max(1, math.ceil(wait_s))
    headers = {"Retry-After": str(retry_s), **({"Connection": "close"} if close else {})}
    detail = f"{who} is past {limit}: retry after {retry_s} s"
    raise ApiProblem(429, detail, headers=headers, kind="rate-limited")


@dataclass
class RateLimiter:
    """The API process's limiter: one asyncio Redis client per event loop, made at first use."""

    settings: Settings
    _client: redis.asyncio.Redis | None = field(default=None, init=False)
    _loop: asyncio.AbstractEventLoop | None = field(default=None, init=False)
    _script: tuple[Any, Any] | None = field(default=None, init=False)  # (take, debit): AsyncScripts
    _paused_until_s: float = field(default=0.0, init=False)
    # (tenant, cost) -> when its tokens are back (monotonic s): until then it is refused from
    # memory, so a client that ignores Retry-After costs one Redis call per wait, not per request.
    _refused_until_s: dict[tuple[str, int], float] = field(default_factory=dict, init=False)

    def cost_of(self, route: str) -> int:
        """The tokens a request of `route` ("METHOD /template") takes (never more than a full bucket)."""
        return min(ROUTE_COSTS.get(route, 1), self.settings.api_rate_burst)

    async def wait_s(self, tenant: str, cost: int) -> float | None:
        """None: the request may go on (tokens taken, or no limit, or Redis away); else the seconds
        until its tokens are back."""
        rate, burst = self.settings.api_rate_per_s, self.settings.api_rate_burst
        return await self._take(RATE_BUCKET_KEY.format(tenant=tenant), tenant, rate, burst, cost)

    async def body_wait_s(self, tenant: str, size_bytes: int) -> float | None:
        """`wait_s` for a declared body of `size_bytes`, from the tenant's bytes bucket."""
        rate, burst = self.settings.api_body_bytes_per_s, self.settings.api_body_burst_bytes
        cost = min(size_bytes, burst)  # larger ones are refused (413) before
        return await self._take(BODY_BUCKET_KEY.format(tenant=tenant), "body:" + tenant, rate, burst, cost)

    async def body_debit(self, tenant: str, size_bytes: int) -> None:
        """Pay for a streamed body of `size_bytes` once read (the bucket may go into debt)."""
        if size_bytes > 0:
            rate, burst = self.settings.api_body_bytes_per_s, self.settings.api_body_burst_bytes
            await self._debit(BODY_BUCKET_KEY.format(tenant=tenant), rate, burst, size_bytes)

    async def _debit(self, key: str, rate: float, burst: int, cost: int) -> None:
        """Take `cost` from the bucket whatever it holds (a negative cost gives tokens back)."""
        if rate <= 0 or time.monotonic() < self._paused_until_s:
            return
        try:
            await self._scripts()[1](keys=[self.settings.redis_prefix + key], args=[rate, burst, cost])
        except (redis.RedisError, OSError) as e:
            self._pause(e)

    async def _take(self, key: str, who: str, rate: float, burst: int, cost: int) -> float | None:
        now_s = time.monotonic()
        if rate <= 0:
            return None
        if now_s < (until_s := self._refused_until_s.get((who, cost), 0.0)):
            return until_s - now_s  # tokens come back no sooner: other processes can only take more
        if now_s < self._paused_until_s:
            return None
        try:
            taken, wait_ms = await self._scripts()[0](keys=[self.settings.redis_prefix + key], args=[rate, burst, cost])
        except (redis.RedisError, OSError) as e:  # OSError: timeouts and refused connections too
            self._pause(e)
            return None
        if taken:
            return None
        self._remember(who, cost, now_s + int(wait_ms) / 1000)
        return int(wait_ms) / 1000

    def _pause(self, error: Exception) -> None:
        self._paused_until_s = time.monotonic() + OUTAGE_PAUSE_S
        log.warning("rate limits are off for %.0f s: Redis cannot be reached (%s)", OUTAGE_PAUSE_S, error)

    def _remember(self, tenant: str, cost: int, until_s: float) -> None:
        if len(self._refused_until_s) >= MAX_REMEMBERED:
            now_s = time.monotonic()
            self._refused_until_s = {k: t for k, t in self._refused_until_s.items() if t > now_s}
        self._refused_until_s[(tenant, cost)] = until_s

    async def check(self, tenant: str, route: str) -> None:
        """Take the request's tokens (`route`: "METHOD /template") from the tenant's bucket; 429 with
        Retry-After when too few are left."""
        cost = self.cost_of(route)
        rate, burst = self.settings.api_rate_per_s, self.settings.api_rate_burst
        limit = (
            f"its rate limit of {rate:g} request(s)/s with a burst of {burst} (IPAB_API_RATE_PER_S, "
            f"IPAB_API_RATE_BURST); this request costs {cost} token(s)"
        )
        await _refuse_while(await self.wait_s(tenant, cost), f"tenant {tenant!r}", limit)

    async def check_body(self, tenant: str, size_bytes: int) -> None:
        """Pay for a declared body of `size_bytes` from the tenant's bytes bucket; 429 with Retry-After
        and `Connection: close` (the body is never read) when it cannot pay."""
        rate, burst = self.settings.api_body_bytes_per_s, self.settings.api_body_burst_bytes
        limit = (
            f"its rate of large bodies, {rate / MIB:g} MiB/s with a burst of {burst / MIB:g} MiB "
            f"(IPAB_API_BODY_BYTES_PER_S, IPAB_API_BODY_BURST_BYTES); this body of {size_bytes} bytes was not read"
        )
        await _refuse_while(await self.body_wait_s(tenant, size_bytes), f"tenant {tenant!r}", limit, close=True)

    async def check_key_lookup(self, client: str) -> None:
        """Take a token from the client address's bucket of key lookups before a key that is not in
        the cache is looked up in SQL (given back if the key is valid: `refund_key_lookup`); 429
        with Retry-After when none is left. Without it, every request with a made-up key cost a
        SQL query (3 ms), from anybody, with no key to limit."""
        rate, burst = self.settings.api_key_lookups_per_s, self.settings.api_key_lookup_burst
        key = KEY_LOOKUP_BUCKET_KEY.format(client=client)
        limit = (
            f"its rate of API key lookups, {rate:g}/s with a burst of {burst} (IPAB_API_KEY_LOOKUPS_PER_S, "
            "IPAB_API_KEY_LOOKUP_BURST): keys not used here lately, unknown ones too, are looked up that often"
        )
        await _refuse_while(await self._take(key, "key-lookups:" + client, rate, burst, 1), f"client {client}", limit)

    async def refund_key_lookup(self, client: str) -> None:
        """Give back the token of a lookup that found a valid key: only unknown keys use up the
        bucket, so many tenants behind one address (a NAT) are not limited by their own lookups."""
        rate, burst = self.settings.api_key_lookups_per_s, self.settings.api_key_lookup_burst
        await self._debit(KEY_LOOKUP_BUCKET_KEY.format(client=client), rate, burst, -1)

    def _scripts(self) -> tuple[Any, Any]:
        """(take, debit): the scripts on this event loop's client."""
        loop = asyncio.get_running_loop()
        if self._client is None or self._loop is not loop:  # a client's connections belong to one loop
            self._client = connect_async_redis(self.settings.redis_url, profile=LIMITER)
            self._loop = loop
            self._script = (self._client.register_script(TAKE_LUA), self._client.register_script(DEBIT_LUA))
        assert self._script is not None
        return self._script

    async def aclose(self) -> None:
        """Close the client (in the loop that made it)."""
        if self._client is not None and self._loop is asyncio.get_running_loop():
            await self._client.aclose()
        self._client = self._loop = self._script = None
