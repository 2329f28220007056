"""At most one request with a large body in flight per tenant, in each API process.

A batch of 100,000 rows, a 32 MiB body of invalid lines or an image bomb costs the `ipab api`
process seconds of CPU; and that CPU holds the GIL, so every other tenant's requests wait
on it. The rate limit cannot see this: each such request takes one token. So the routes
that read a large body (POST /v1/batches, POST /v1/references, POST /v1/plans) take the
tenant's one slot first, before any of the body is read. A tenant then has one such request
of the process at a time, whatever it sends, and other tenants share the process with that
one request, not with all of them.

A request that finds the slot taken waits for it up to WAIT_S, its body unread, and is then
refused with 429 (`busy`) and `Retry-After`. Refused at once, a client that ignores
Retry-After sent its next body at once: measured (bench/two_tenants.py), the hostile tenant's
threads got about 12 refusals a second each, the API received and dropped some 200 MB/s of
their bodies on its event loop, and the calm tenant's p99 went from 335 to 576 ms. Waiting
bounds that to one refusal per connection per WAIT_S (as the rate limit's refusals are), and
a client that sends two small uploads at once gets both served, one after the other.

Each such body is paid for in bytes first, from the tenant's bytes bucket (`RateLimiter.check_body`,
before the slot is taken, the body unread), or, streamed without a Content-Length, once read
(BodyLimit counts it).

The locks are the event loop's (one thread takes and frees them). They are each process's
own: N API processes let a tenant have N such requests at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Final

from starlette.requests import Request

from scheduler.api.middleware import body_bytes_read
from scheduler.api.problems import ApiProblem
from scheduler.api.rate_limit import RateLimiter

WAIT_S: Final = 1.0
RETRY_AFTER_S: Final = 1
GATED_ROUTES: Final = "POST /v1/batches, POST /v1/references, POST /v1/plans"


@dataclass
class HeavyGate:
    """Each tenant's slot for a large-body request, and the route that holds it."""

    limiter: RateLimiter
    _locks: dict[str, asyncio.Lock] = field(default_factory=dict)
    _holders: dict[str, str] = field(default_factory=dict)

    @asynccontextmanager
    async def slot(self, request: Request, *, tenant: str, route: str) -> AsyncIterator[None]:
        """Hold `tenant`'s slot while the block runs; 429 (`busy`) when another request held it for
        WAIT_S, 429 (`rate-limited`) when the tenant's bytes bucket cannot pay for the body."""
        declared = request.headers.get("content-length", "")
        if declared.isdigit():
            await self.limiter.check_body(tenant, int(declared))
        try:
            async with self._held(tenant=tenant, route=route):
                yield
        finally:
            if not declared.isdigit():
                await self.limiter.body_debit(tenant, body_bytes_read(request.scope))

    @asynccontextmanager
    async def _held(self, *, tenant: str, route: str) -> AsyncIterator[None]:
        lock = self._locks.setdefault(tenant, asyncio.Lock())  # a lock per tenant with a key: a few
        try:
            await asyncio.wait_for(lock.acquire(), WAIT_S)
        except TimeoutError:
            raise busy(tenant, self._holders.get(tenant, "another request")) from None
        self._holders[tenant] = route
        try:
            yield
        finally:
            del self._holders[tenant]
            lock.release()


def busy(tenant: str, holder: str) -> ApiProblem:
    """429 naming the limit, the request that holds the slot, and when to retry."""
    detail = (
        f"tenant {tenant!r} already has a request with a large body in progress ({holder}): at most "
        f"one at a time per tenant among {GATED_ROUTES}, and this one waited {WAIT_S:g} s for it; "
        f"send the next once that one is answered (retry after {RETRY_AFTER_S} s)"
    )
    return ApiProblem(429, detail, headers={"Retry-After": str(RETRY_AFTER_S)}, kind="busy")
