"""Standard Webhooks signatures: HMAC-SHA256 over `id.timestamp.body`, keyed by the tenant's secret."""

from __future__ import annotations

import base64
import hashlib
import hmac
import time


def sign(*, secret: str, msg_id: str, timestamp_s: int, body: bytes) -> str:
    """`v1,<base64 HMAC-SHA256 over "id.timestamp.body">` keyed by the secret's base64 part."""
    key = base64.b64decode(secret.removeprefix("whsec_"))
    digest = hmac.new(key, f"{msg_id}.{timestamp_s}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(*, secret: str, headers: dict[str, str], body: bytes, tolerance_s: float = 300.0) -> bool:
    """Whether a delivery is genuine and fresh (what a receiver runs; tests use it)."""
    msg_id, stamp = headers.get("webhook-id", ""), headers.get("webhook-timestamp", "")
    if not stamp.isdigit() or abs(time.time() - int(stamp)) > tolerance_s:
        return False
    expected = sign(secret=secret, msg_id=msg_id, timestamp_s=int(stamp), body=body)
    offered = headers.get("webhook-signature", "").split()
    return any(hmac.compare_digest(expected, sig) for sig in offered)
