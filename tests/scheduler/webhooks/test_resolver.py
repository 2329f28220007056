"""Webhook host look-ups: bounded in time, and one tenant's hanging names hold only its own few threads.

The look-up is replaced by one that hangs for `hang.*` hosts (as getaddrinfo does when DNS
never answers) and answers at once for others: no DNS, no network.
"""

from __future__ import annotations

import asyncio
import ipaddress
import threading
import time
from collections.abc import Iterator

import pytest

from scheduler.webhooks.resolver import PER_TENANT, Resolver
from shared.errors import InvalidInput

PUBLIC = ipaddress.ip_address("93.184.215.14")


class HangingDns:
    """A look-up that hangs for `hang.*` hosts until released, counting how many hang at once."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.hanging = 0
        self.most_hanging = 0
        self._lock = threading.Lock()

    def __call__(self, host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        if not host.startswith("hang."):
            return [PUBLIC]
        with self._lock:
            self.hanging += 1
            self.most_hanging = max(self.most_hanging, self.hanging)
        self.release.wait(30)
        with self._lock:
            self.hanging -= 1
        raise InvalidInput("webhook.url", host, "does not resolve")


@pytest.fixture
def dns() -> Iterator[tuple[HangingDns, Resolver]]:
    """A hanging look-up and a resolver using it; the hanging threads are released afterwards."""
    lookup = HangingDns()
    resolver = Resolver(lookup=lookup)
    yield lookup, resolver
    lookup.release.set()
    resolver.close()


def test_a_hanging_look_up_is_refused_after_the_timeout_naming_the_url_and_the_seconds(
    dns: tuple[HangingDns, Resolver],
) -> None:
    _, resolver = dns
    start = time.monotonic()
    with pytest.raises(InvalidInput) as refused:
        resolver.public_address("https://hang.example/hook", tenant="a", timeout_s=0.3, allow_private=False)
    assert 0.25 < time.monotonic() - start < 1.0
    assert refused.value.field == "webhook.url"
    assert "did not resolve in 0.3 s" in str(refused.value)


def test_one_tenants_hanging_names_hold_only_its_own_threads_and_others_resolve_at_once(
    dns: tuple[HangingDns, Resolver],
) -> None:
    lookup, resolver = dns

    async def flood() -> tuple[list[BaseException | list[object]], float, list[object]]:
        hanging = [resolver.addresses_async(f"http://hang.example/{i}", tenant="a", timeout_s=0.5) for i in range(40)]
        slow = asyncio.gather(*hanging, return_exceptions=True)
        await asyncio.sleep(0.1)
        start = time.monotonic()
        other = await resolver.addresses_async("https://hooks.example/x", tenant="b", timeout_s=0.5)
        took = time.monotonic() - start
        return await slow, took, list(other)

    refused, took, other = asyncio.run(flood())
    assert other == [PUBLIC]
    assert took < 0.1, took
    assert all(isinstance(r, InvalidInput) and "did not resolve in 0.5 s" in str(r) for r in refused), refused
    assert lookup.most_hanging == PER_TENANT


def test_a_look_up_that_timed_out_still_holds_its_slot_until_its_thread_is_free(
    dns: tuple[HangingDns, Resolver],
) -> None:
    lookup, resolver = dns
    for _ in range(3 * PER_TENANT):
        with pytest.raises(InvalidInput):
            resolver.addresses("http://hang.example/", tenant="a", timeout_s=0.1)
    assert lookup.most_hanging == PER_TENANT  # callers gave up; the C library's threads did not
    lookup.release.set()
    time.sleep(0.1)
    assert resolver.addresses("http://fine.example/", tenant="a", timeout_s=0.5) == [PUBLIC]
