"""Where a webhook may go: an http(s) URL with a host, no credentials, and a public address.

Delivery never goes to loopback, private or link-local addresses unless
IPAB_WEBHOOK_ALLOW_PRIVATE=true. Plans check their webhook URLs with the same functions.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any, Final
from urllib.parse import urlsplit

from shared.errors import InvalidInput

MAX_URL_CHARS: Final = 2000


def _addresses(host: str, port: int) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as e:
        raise InvalidInput("webhook.url", host, f"does not resolve ({e})") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%", 1)[0]) for info in infos]


def public_address(url: str, *, allow_private: bool) -> tuple[str, int, str]:
    """(host, port, first allowed IP) of a webhook URL; `InvalidInput` for a private or loopback one."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = _addresses(host, port)
    if not allow_private:
        bad = [a for a in addresses if not a.is_global or a.is_multicast]
        if bad:
            reason = f"resolves to {bad[0]}, a private, loopback or reserved address; webhooks go to public hosts"
            raise InvalidInput("webhook.url", url, reason)
    return host, port, str(addresses[0])


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


def check_webhook_url(url: Any, *, allow_private: bool) -> str:
    """A webhook URL fit to store: `check_url_form`, and a public address."""
    checked = check_url_form(url)
    public_address(checked, allow_private=allow_private)
    return checked
