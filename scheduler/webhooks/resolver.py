"""Look-ups of webhook hosts: bounded in time, off the event loop, and fair between tenants.

`getaddrinfo` blocks, and nothing can cancel it: a host whose DNS server never answers
holds its thread for as long as the C library retries (10 s and more with glibc's
defaults). Called on the event loop, one such look-up froze the whole API; called in the
request thread pool, 45 of them filled it and another tenant waited 8 s to list batches.

So look-ups run here, in a pool of their own, and a tenant has at most PER_TENANT of them
running at once, each counted until its thread is free again, even after its caller gave
up: one tenant's hanging names hold PER_TENANT threads, no more, and every other tenant's
look-ups start at once. A caller waits at most the timeout (IPAB_WEBHOOK_DNS_TIMEOUT_S) for
a free slot and the answer together, then gets `InvalidInput` naming webhook.url. (Past
THREADS / PER_TENANT tenants hanging at once, look-ups queue for a thread; each caller still
waits no longer than its timeout.)

Why not asyncio's `loop.getaddrinfo` under `asyncio.wait_for`: it runs in the loop's shared
executor (under uvloop, libuv's pool of 4 threads), and a timed-out look-up keeps its
thread, so a few hanging names would delay everybody's look-ups, and more.

Numeric hosts (`203.0.113.9`, `[2001:db8::1]`, `2130706433`) need no DNS: parsed at once.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import time
from collections.abc import Callable
from typing import Final

from scheduler.webhooks.addresses import (
    IPAddress,
    check_url_form,
    checked_address,
    lookup,
    numeric_addresses,
    split_host,
)
from shared.errors import InvalidInput

THREADS: Final = 32
PER_TENANT: Final = 4
Lookup = Callable[[str, int], list[IPAddress]]
Answer = concurrent.futures.Future[list[IPAddress]]


def _timed_out(url: str, timeout_s: float) -> InvalidInput:
    return InvalidInput(
        "webhook.url", url, f"did not resolve in {timeout_s:g} s; check that its DNS answers, then send it again"
    )


class Resolver:
    """Webhook host look-ups in a pool of their own, at most `per_tenant` running per tenant."""

    def __init__(self, *, lookup: Lookup = lookup, threads: int = THREADS, per_tenant: int = PER_TENANT) -> None:
        self._lookup = lookup
        self._per_tenant = per_tenant
        self._pool = concurrent.futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix="webhook-dns")
        self._lock = threading.Lock()
        self._running: dict[str, set[Answer]] = {}

    def _start(self, tenant: str, host: str, port: int) -> tuple[Answer | None, list[Answer]]:
        """A look-up started for `tenant`, or None and the tenant's running ones when it has no slot free."""
        with self._lock:
            running = self._running.setdefault(tenant, set())
            if len(running) >= self._per_tenant:
                return None, list(running)
            answer = self._pool.submit(self._lookup, host, port)
            running.add(answer)
        answer.add_done_callback(lambda done: self._finished(tenant, done))
        return answer, []

    def _finished(self, tenant: str, answer: Answer) -> None:
        with self._lock:
            running = self._running.get(tenant, set())
            running.discard(answer)
            if not running:
                self._running.pop(tenant, None)

    def _slot(self, url: str, tenant: str, timeout_s: float, remaining_s: float) -> tuple[Answer | None, list[Answer]]:
        """`_start` for `url`'s host; timed out when the tenant has no slot free and no time is left."""
        answer, busy = self._start(tenant, *split_host(url))
        if answer is None and remaining_s <= 0:
            raise _timed_out(url, timeout_s)
        return answer, busy

    def addresses(self, url: str, *, tenant: str, timeout_s: float) -> list[IPAddress]:
        """The addresses of `url`'s host, waiting at most `timeout_s` (blocking: for threads)."""
        numeric = numeric_addresses(*split_host(url))
        if numeric is not None:
            return numeric
        deadline = time.monotonic() + timeout_s
        while True:
            answer, busy = self._slot(url, tenant, timeout_s, deadline - time.monotonic())
            remaining = max(0.0, deadline - time.monotonic())
            if answer is None:
                concurrent.futures.wait(busy, timeout=remaining, return_when=concurrent.futures.FIRST_COMPLETED)
                continue
            try:
                return answer.result(timeout=remaining)
            except concurrent.futures.TimeoutError:
                answer.cancel()  # a look-up still queued need not run
                raise _timed_out(url, timeout_s) from None

    async def addresses_async(self, url: str, *, tenant: str, timeout_s: float) -> list[IPAddress]:
        """`addresses`, awaited: the event loop goes on while the look-up runs."""
        numeric = numeric_addresses(*split_host(url))
        if numeric is not None:
            return numeric
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while True:
            answer, busy = self._slot(url, tenant, timeout_s, deadline - loop.time())
            if answer is None:
                await _any_done(busy, timeout_s=max(0.0, deadline - loop.time()))
                continue
            try:
                return await asyncio.wait_for(asyncio.wrap_future(answer), max(0.0, deadline - loop.time()))
            except TimeoutError:
                raise _timed_out(url, timeout_s) from None

    def public_address(self, url: str, *, tenant: str, timeout_s: float, allow_private: bool) -> tuple[str, int, str]:
        """(host, port, the address to connect to) of a webhook URL; `InvalidInput` for a refused or silent one."""
        host, port = split_host(url)
        addresses = self.addresses(url, tenant=tenant, timeout_s=timeout_s)
        return host, port, checked_address(url, addresses, allow_private=allow_private)

    async def check_webhook_url(self, url: object, *, tenant: str, timeout_s: float, allow_private: bool) -> str:
        """A webhook URL fit to store: `check_url_form`, and public addresses, looked up within `timeout_s`."""
        checked = check_url_form(url)
        addresses = await self.addresses_async(checked, tenant=tenant, timeout_s=timeout_s)
        checked_address(checked, addresses, allow_private=allow_private)
        return checked

    def close(self) -> None:
        """Stop: queued look-ups are dropped; running ones end in their thread, unwaited."""
        self._pool.shutdown(wait=False, cancel_futures=True)


async def _any_done(answers: list[Answer], *, timeout_s: float) -> None:
    """Wait until one of `answers` is done (another caller's look-ups: their results are not ours to take)."""
    loop = asyncio.get_running_loop()
    woken: asyncio.Future[None] = loop.create_future()

    def wake(_: Answer) -> None:
        def settle() -> None:
            if not woken.done():
                woken.set_result(None)

        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits any more
            loop.call_soon_threadsafe(settle)

    for answer in answers:
        answer.add_done_callback(wake)
    await asyncio.wait([woken], timeout=timeout_s)
