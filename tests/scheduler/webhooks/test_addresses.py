"""Where a webhook may go, judged by what an address reaches: no network at all.

Every address here is a literal: `refusal` is pure, and the URL cases use numeric hosts
only, which the C library parses without DNS (a resolver whose look-up fails the test
proves it).
"""

from __future__ import annotations

import ipaddress

import pytest

from scheduler.webhooks.addresses import checked_address, numeric_addresses, refusal, split_host
from scheduler.webhooks.resolver import Resolver
from shared.errors import InvalidInput

# (address, allowed, a word the refusal must contain)
ADDRESSES: list[tuple[str, bool, str]] = [
    # IPv4: public
    ("8.8.8.8", True, ""),
    ("1.1.1.1", True, ""),
    ("100.63.255.255", True, ""),  # just below the shared space
    ("100.128.0.0", True, ""),  # just above it
    ("172.15.255.255", True, ""),
    ("172.32.0.0", True, ""),
    ("198.17.255.255", True, ""),  # just below benchmarking
    ("198.20.0.0", True, ""),  # just above it
    ("223.255.255.254", True, ""),
    # IPv4: refused
    ("0.0.0.0", False, "this network"),
    ("0.1.2.3", False, "this network"),
    ("10.0.0.1", False, "private"),
    ("100.64.0.1", False, "shared"),
    ("100.127.255.254", False, "shared"),
    ("127.0.0.1", False, "loopback"),
    ("127.255.255.254", False, "loopback"),
    ("169.254.169.254", False, "link-local"),
    ("172.16.0.1", False, "private"),
    ("172.31.255.255", False, "private"),
    ("192.0.0.9", False, "protocol assignments"),
    ("192.0.2.1", False, "documentation"),
    ("192.88.99.1", False, "6to4 relay"),
    ("192.168.1.1", False, "private"),
    ("198.18.0.1", False, "benchmarking"),
    ("198.19.255.255", False, "benchmarking"),
    ("198.51.100.7", False, "documentation"),
    ("203.0.113.9", False, "documentation"),
    ("224.0.0.1", False, "multicast"),
    ("239.255.255.250", False, "multicast"),
    ("240.0.0.1", False, "reserved"),
    ("255.255.255.255", False, "broadcast"),
    # IPv6: public
    ("2606:4700:4700::1111", True, ""),
    ("2001:4860:4860::8888", True, ""),
    ("2a00:1450:4001:80e::200e", True, ""),
    # IPv6: refused
    ("::", False, "unspecified"),
    ("::1", False, "loopback"),
    ("fe80::1", False, "link-local"),
    ("fec0::1", False, "site-local"),
    ("fc00::1", False, "unique local"),
    ("fd12:3456:789a::1", False, "unique local"),
    ("ff02::1", False, "multicast"),
    ("ff0e::1", False, "multicast"),
    ("2001:db8::1", False, "documentation"),
    ("3fff::1", False, "documentation"),
    ("2001:2::1", False, "benchmarking"),
    ("100::1", False, "discard"),
    ("2001:10::1", False, "ORCHID"),
    ("2001:20::1", False, "ORCHID"),
    ("::1:0:0:0", False, "reserved"),
    # IPv6 forms that embed an IPv4 address: allowed only where the embedded one is public...
    ("::ffff:8.8.8.8", True, ""),  # IPv4-mapped
    ("64:ff9b::808:808", True, ""),  # NAT64
    ("2002:808:808::1", True, ""),  # 6to4
    # ...and refused for what they embed
    ("::ffff:127.0.0.1", False, "127.0.0.1"),
    ("::ffff:169.254.169.254", False, "169.254.169.254"),
    ("::ffff:10.0.0.1", False, "10.0.0.1"),
    ("::127.0.0.1", False, "127.0.0.1"),  # IPv4-compatible
    ("::169.254.169.254", False, "169.254.169.254"),
    ("::10.0.0.1", False, "10.0.0.1"),
    ("::ffff:0:127.0.0.1", False, "127.0.0.1"),  # SIIT
    ("::ffff:0:169.254.169.254", False, "169.254.169.254"),
    ("::ffff:0:10.0.0.1", False, "10.0.0.1"),
    ("64:ff9b::7f00:1", False, "127.0.0.1"),  # NAT64
    ("64:ff9b::a9fe:a9fe", False, "169.254.169.254"),
    ("64:ff9b::a00:1", False, "10.0.0.1"),
    ("64:ff9b:1::7f00:1", False, "local-use NAT64"),
    ("64:ff9b:1:a9fe:a9:fe00::", False, "local-use NAT64"),
    ("2002:7f00:1::", False, "127.0.0.1"),  # 6to4
    ("2002:a9fe:a9fe::1", False, "169.254.169.254"),
    ("2002:a00:1::", False, "10.0.0.1"),
    ("2001:0:4136:e378:8000:63bf:80ff:fffe", False, "127.0.0.1"),  # Teredo, client bits inverted
    ("2001:0:4136:e378::5601:5601", False, "169.254.169.254"),
    ("2001:0:4136:e378::f5ff:fffe", False, "10.0.0.1"),
    # ...and refused as forms that are deprecated or reach a tunnel, whatever they embed
    ("::8.8.8.8", False, "IPv4-compatible"),
    ("::ffff:0:8.8.8.8", False, "SIIT"),
    ("2001:0:4136:e378:8000:63bf:f7f7:fbfb", False, "Teredo"),  # client 8.8.4.4
]


@pytest.mark.parametrize(("address", "allowed", "word"), ADDRESSES, ids=[a for a, _, _ in ADDRESSES])
def test_an_address_is_allowed_only_when_it_and_what_it_embeds_are_public(
    address: str, allowed: bool, word: str
) -> None:
    reason = refusal(ipaddress.ip_address(address))
    if allowed:
        assert reason is None, reason
    else:
        assert reason is not None, f"{address} was allowed"
        assert word.lower() in reason.lower(), reason


# Numeric hosts the C library reads as an address without DNS: (URL, what it reaches, allowed).
NUMERIC_URLS: list[tuple[str, str, bool]] = [
    ("http://2130706433/", "127.0.0.1", False),  # decimal
    ("http://0x7f.1/", "127.0.0.1", False),  # hex, two parts
    ("http://017700000001/", "127.0.0.1", False),  # octal
    ("http://0x7f000001/", "127.0.0.1", False),
    ("http://127.1/", "127.0.0.1", False),
    ("http://0251.0376.0251.0376/latest/meta-data/", "169.254.169.254", False),
    ("http://0xa9fea9fe/", "169.254.169.254", False),
    ("http://10.1:8080/", "10.0.0.1", False),
    ("http://[::ffff:7f00:1]/", "127.0.0.1", False),
    ("http://[::127.0.0.1]:8080/", "127.0.0.1", False),
    ("http://[64:ff9b::7f00:1]/", "127.0.0.1", False),
    ("http://[2002:7f00:1::]/", "127.0.0.1", False),
    ("http://[::ffff:0:127.0.0.1]/", "127.0.0.1", False),
    ("https://[::1]/", "::1", False),
    ("http://134744072/", "8.8.8.8", True),  # decimal 8.8.8.8
    ("https://0x8.0x8.0x8.0x8/", "8.8.8.8", True),
    ("https://[2606:4700:4700::1111]/", "2606:4700:4700::1111", True),
]


@pytest.mark.parametrize(("url", "reaches", "allowed"), NUMERIC_URLS, ids=[u for u, _, _ in NUMERIC_URLS])
def test_a_numeric_host_is_judged_by_the_address_it_parses_to(url: str, reaches: str, allowed: bool) -> None:
    host, port = split_host(url)
    addresses = numeric_addresses(host, port)
    assert addresses is not None, f"{host} needs DNS"
    if allowed:
        assert checked_address(url, addresses, allow_private=False) == reaches
    else:
        with pytest.raises(InvalidInput) as refused:
            checked_address(url, addresses, allow_private=False)
        assert refused.value.field == "webhook.url"
        assert reaches in refused.value.allowed


def test_numeric_hosts_never_reach_dns_and_are_refused_by_what_they_reach() -> None:
    def no_dns(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
        raise AssertionError(f"{host} went to DNS")

    resolver = Resolver(lookup=no_dns)
    try:
        for url, reaches, allowed in NUMERIC_URLS:
            if allowed:
                assert resolver.public_address(url, tenant="t", timeout_s=1.0, allow_private=False)[2]
                continue
            with pytest.raises(InvalidInput, match=reaches.replace(".", r"\.")):
                resolver.public_address(url, tenant="t", timeout_s=1.0, allow_private=False)
    finally:
        resolver.close()


def test_private_addresses_pass_where_the_operator_allows_them() -> None:
    addresses = numeric_addresses("127.0.0.1", 80)
    assert addresses is not None
    assert checked_address("http://127.0.0.1/", addresses, allow_private=True) == "127.0.0.1"
