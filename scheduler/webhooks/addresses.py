"""Where a webhook may go: an http(s) URL with a host, no credentials, and a public address.

An address is judged by what it reaches: an IPv6 address that embeds an IPv4 one (mapped,
compatible, SIIT, NAT64, 6to4, Teredo) is unwrapped, and the IPv4 address inside must be
public too, or `[::ffff:127.0.0.1]` and `[64:ff9b::a9fe:a9fe]` would reach loopback and the
cloud metadata service. Hosts are judged by the addresses they resolve to, so the numeric
forms that the C library reads as IPv4 (`2130706433`, `0x7f.1`, `017700000001`) are judged as
the 127.0.0.1 they are. Delivery never goes to a refused address unless
IPAB_WEBHOOK_ALLOW_PRIVATE=true. Name look-ups are `resolver`'s; plans check their webhook
URLs' form with `check_url_form`.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import urlsplit

from shared.errors import InvalidInput

MAX_URL_CHARS: Final = 2000
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_V4, _V6 = ipaddress.IPv4Network, ipaddress.IPv6Network

# Never a webhook's destination: the network, then what it is; most specific first where they nest.
_REFUSED_TABLE: Final = """
0.0.0.0/8           a 'this network' address
10.0.0.0/8          a private address
100.64.0.0/10       a shared (carrier-grade NAT) address
127.0.0.0/8         a loopback address
169.254.0.0/16      a link-local address (cloud metadata lives here)
172.16.0.0/12       a private address
192.0.0.0/24        an IETF protocol assignments address
192.0.2.0/24        a documentation address
192.88.99.0/24      a 6to4 relay anycast address
192.168.0.0/16      a private address
198.18.0.0/15       a benchmarking address
198.51.100.0/24     a documentation address
203.0.113.0/24      a documentation address
224.0.0.0/4         a multicast address
255.255.255.255/32  the broadcast address
240.0.0.0/4         a reserved address
::/128              the unspecified address
::1/128             the loopback address
64:ff9b:1::/48      a local-use NAT64 address (RFC 8215), not globally reachable
100::/64            a discard-only address
2001:2::/48         a benchmarking address
2001:10::/28        an ORCHID address
2001:20::/28        an ORCHIDv2 address
2001:db8::/32       a documentation address
3fff::/20           a documentation address
fc00::/7            a unique local (private) address
fe80::/10           a link-local address
fec0::/10           a site-local address
ff00::/8            a multicast address
"""
_REFUSED = [line.split(None, 1) for line in _REFUSED_TABLE.strip().splitlines()]
REFUSED_V4: Final = tuple((_V4(cidr), what) for cidr, what in _REFUSED if ":" not in cidr)
REFUSED_V6: Final = tuple((_V6(cidr), what) for cidr, what in _REFUSED if ":" in cidr)
# IPv6 forms that carry an IPv4 address, and whether the form itself may be a destination:
# mapped, NAT64 and 6to4 reach the IPv4 host they embed; the others are deprecated or
# reach a tunnel, so they are refused whatever they embed.
_MAPPED, _COMPATIBLE, _SIIT = _V6("::ffff:0:0/96"), _V6("::/96"), _V6("::ffff:0:0:0/96")
_NAT64, _SIX_TO_FOUR, _TEREDO = _V6("64:ff9b::/96"), _V6("2002::/16"), _V6("2001::/32")
_OPEN_FORMS: Final = ("IPv4-mapped", "NAT64", "6to4")
_CLOSED_FORMS: Final = {
    "IPv4-compatible": "a deprecated IPv4-compatible address",
    "SIIT": "an SIIT (IPv4-translated) address",
    "Teredo client": "a Teredo tunnel address",
}


def _low32(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address:
    return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)


def embedded_ipv4(address: ipaddress.IPv6Address) -> list[tuple[str, ipaddress.IPv4Address]]:
    """The IPv4 addresses an IPv6 address carries, each with the form's name (Teredo: server and client)."""
    if address in _MAPPED:
        return [("IPv4-mapped", _low32(address))]
    if address in _SIIT:
        return [("SIIT", _low32(address))]
    if address in _COMPATIBLE and int(address) > 1:
        return [("IPv4-compatible", _low32(address))]
    if address in _NAT64:
        return [("NAT64", _low32(address))]
    if address.sixtofour is not None:
        return [("6to4", address.sixtofour)]
    if address.teredo is not None:
        server, client = address.teredo  # the client's bits come inverted; `teredo` undoes that
        return [("Teredo client", client), ("Teredo server", server)]
    return []


def _listed(address: IPAddress) -> str | None:
    table = REFUSED_V4 if isinstance(address, ipaddress.IPv4Address) else REFUSED_V6
    return next((what for network, what in table if address in network), None)


def _ipv4_refusal(address: ipaddress.IPv4Address) -> str | None:
    listed = _listed(address)
    if listed is not None:
        return f"{listed} ({address})"
    return None if address.is_global else f"a non-global address ({address})"


def refusal(address: IPAddress) -> str | None:
    """Why a webhook may not go to `address`, or None when it may: it and every IPv4 inside are public."""
    if isinstance(address, ipaddress.IPv4Address):
        return _ipv4_refusal(address)
    inner = embedded_ipv4(address)
    for form, ipv4 in inner:
        reason = _ipv4_refusal(ipv4)
        if reason is not None:
            return f"an IPv6 address that reaches {ipv4} ({form}), {reason}"
    if inner:
        form = inner[0][0]
        return None if form in _OPEN_FORMS else f"{_CLOSED_FORMS[form]} ({address}), which webhooks do not use"
    listed = _listed(address)
    if listed is not None:
        return f"{listed} ({address})"
    if address.is_reserved or not address.is_global:
        return f"a reserved or non-global address ({address})"
    return None


def split_host(url: str) -> tuple[str, int]:
    """(host, port) of a checked URL; the port defaults by scheme."""
    parts = urlsplit(url)
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def _addresses_of(infos: Sequence[tuple[Any, ...]]) -> list[IPAddress]:
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def numeric_addresses(host: str, port: int) -> list[IPAddress] | None:
    """The address of a numeric host, as the C library reads it (`0x7f.1` too), without DNS; None for a name."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_NUMERICHOST)
    except (OSError, UnicodeError):
        return None
    return _addresses_of(infos)


def lookup(host: str, port: int) -> list[IPAddress]:
    """The addresses of `host` (blocking: DNS); `InvalidInput` when it does not resolve."""
    try:
        return _addresses_of(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))
    except (OSError, UnicodeError) as e:
        raise InvalidInput("webhook.url", host, f"does not resolve ({e}); check the host name") from None


def checked_address(url: str, addresses: Sequence[IPAddress], *, allow_private: bool) -> str:
    """The address to connect to for `url`: the first, once none of them is refused; `InvalidInput` otherwise."""
    if not addresses:
        raise InvalidInput("webhook.url", url, "resolves to no address; check the host name")
    if not allow_private:
        for address in addresses:
            reason = refusal(address)
            if reason is not None:
                raise InvalidInput(
                    "webhook.url",
                    url,
                    f"resolves to {address}, {reason}; webhooks go to public hosts "
                    "(IPAB_WEBHOOK_ALLOW_PRIVATE=true lets one host's own services receive them)",
                )
    return str(addresses[0])


def check_url_form(url: Any, *, field: str = "webhook.url") -> str:
    """An http(s) URL with a host and no credentials, of at most MAX_URL_CHARS (its address is not checked)."""
    if not isinstance(url, str) or not url or len(url) > MAX_URL_CHARS:
        raise InvalidInput(field, url, f"must be an http(s) URL of at most {MAX_URL_CHARS} characters")
    try:
        parts = urlsplit(url)
        _ = parts.port
    except ValueError as e:
        raise InvalidInput(field, url, f"is not a URL ({e})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidInput(field, url, "must be an http:// or https:// URL with a host")
    if parts.username or parts.password:
        raise InvalidInput(field, url, "must not carry credentials; verify the signature instead")
    return url
