"""Tenants and their API keys: create, find by key, list, revoke. Only a key's sha256 is stored.

A key is `ipab_` + 43 URL-safe characters (32 random bytes, 256 bits); the tenant's webhook
signing secret is `whsec_` + base64 of 32 random bytes (the Standard Webhooks form), created
with the tenant and shown once.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Final

from sqlalchemy import select, update
from sqlalchemy.orm import Session

from shared.db import DEFAULT_TENANT, ApiKey, Tenant, insert_ignoring_duplicates, utcnow
from shared.dispatch.policy import LANES
from shared.errors import InvalidInput

KEY_PREFIX: Final = "ipab_"
KEY_BYTES: Final = 32  # 256 bits of entropy
SECRET_PREFIX: Final = "whsec_"
SECRET_BYTES: Final = 32
TENANT_NAME: Final = re.compile(r"[a-z0-9][a-z0-9_.-]{0,99}")
# Names no key can own: the operator's. `default` holds what `ipab submit` sends without
# --tenant, so a key of it would list and cancel those batches; `admin`, `system` and `ipab`
# would read as ipab's own, or an admin's, in listings and webhook payloads.
RESERVED_TENANTS: Final = ("default", "admin", "system", "ipab")


@dataclass(frozen=True)
class NewKey:
    """A key just created: the key itself (shown once), its id, and the tenant's secret if the tenant is new."""

    key_id: str
    key: str
    tenant: str
    admin: bool
    webhook_secret: str | None


@dataclass(frozen=True)
class Caller:
    """Who is calling the API: the tenant of a valid, unrevoked key."""

    tenant: str
    key_id: str
    admin: bool


def hash_key(key: str) -> str:
    """The sha256 (hex) of a key, the only form stored."""
    return hashlib.sha256(key.encode("utf-8", errors="surrogatepass")).hexdigest()


def check_tenant_name(value: Any, *, field: str = "--tenant", for_key: bool = False) -> str:
    """A tenant name a key could own: 1 to 100 of a-z 0-9 `_ . -`, starting with a letter or digit, not reserved.

    The one check of keys, plans and `--tenant`. Without `for_key` (a submission, a plan),
    `default` passes: naming the operator's own tenant is what leaving the tenant out does.
    """
    if not isinstance(value, str) or not TENANT_NAME.fullmatch(value):
        raise InvalidInput(field, value, "must be 1 to 100 of a-z 0-9 _ . - starting with a letter or digit, e.g. acme")
    if value in RESERVED_TENANTS and (for_key or value != DEFAULT_TENANT):
        fix = "" if for_key else f", or leave it out for the operator's own tenant {DEFAULT_TENANT!r}"
        reserved = ", ".join(RESERVED_TENANTS)
        raise InvalidInput(field, value, f"is reserved for the operator ({reserved}); choose another tenant name{fix}")
    return value


def reserved_tenant_hint(tenant: str) -> str | None:
    """Why a key of `tenant` opens nothing, when the name is reserved (a key made before it was); None otherwise."""
    if tenant not in RESERVED_TENANTS:
        return None
    return (
        f"this key belongs to tenant {tenant!r}, a name reserved for the operator; revoke it "
        "(`ipab keys revoke ID`, ids in `ipab keys list`) and create one for another tenant "
        "(`ipab keys create --tenant NAME`)"
    )


def new_webhook_secret() -> str:
    """A fresh Standard Webhooks secret, `whsec_<base64 of 32 random bytes>`."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(SECRET_BYTES)).decode()


def ensure_tenant(*, session: Session, name: str) -> str | None:
    """Create tenant `name` unless it exists; returns its new webhook secret, or None if it existed."""
    secret = new_webhook_secret()
    stmt = insert_ignoring_duplicates(Tenant, dialect=session.get_bind().dialect.name, unique=["name"])
    result = session.execute(stmt.values(name=check_tenant_name(name), webhook_secret=secret, created_at=utcnow()))
    return secret if getattr(result, "rowcount", 0) == 1 else None


def create_key(*, session: Session, tenant: str, admin: bool = False) -> NewKey:
    """A new key for `tenant` (created if needed); only its hash is written. No key for a reserved name."""
    secret = ensure_tenant(session=session, name=check_tenant_name(tenant, for_key=True))
    key = KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)
    key_id = "key_" + secrets.token_hex(8)
    session.add(ApiKey(id=key_id, tenant=tenant, admin=admin, key_sha256=hash_key(key), created_at=utcnow()))
    return NewKey(key_id=key_id, key=key, tenant=tenant, admin=admin, webhook_secret=secret)


def find_caller(*, session: Session, key: str) -> Caller | None:
    """The caller holding `key`, or None for an unknown or revoked key."""
    row = session.execute(
        select(ApiKey.id, ApiKey.tenant, ApiKey.admin).where(
            ApiKey.key_sha256 == hash_key(key), ApiKey.revoked_at.is_(None)
        )
    ).one_or_none()
    return None if row is None else Caller(tenant=row.tenant, key_id=row.id, admin=row.admin)


def list_keys(*, session: Session) -> list[ApiKey]:
    """Every key (never the key itself), oldest first."""
    return list(session.scalars(select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)))


def revoke_key(*, session: Session, key_id: str) -> bool:
    """Revoke a key; False when there is no such (unrevoked) key."""
    result = session.execute(
        update(ApiKey).where(ApiKey.id == key_id, ApiKey.revoked_at.is_(None)).values(revoked_at=utcnow())
    )
    return getattr(result, "rowcount", 0) == 1


def tenant_secret(*, session: Session, tenant: str) -> str | None:
    """The tenant's webhook signing secret."""
    return session.scalar(select(Tenant.webhook_secret).where(Tenant.name == tenant))


def tenant_lanes(*, session: Session, tenant: str) -> frozenset[str] | None:
    """The lanes `tenant` may submit to; None: every lane (no restriction, or no such tenant row)."""
    lanes = session.scalar(select(Tenant.lanes).where(Tenant.name == tenant))
    return frozenset(lanes.split(",")) if lanes else None


@dataclass(frozen=True)
class TenantDefaults:
    """What a submission of the tenant starts from: the lanes it may use, the retention of its jobs' objects."""

    lanes: frozenset[str] | None  # None: every lane
    expires_after_s: int | None  # None: the fleet's (IPAB_RETENTION_OUTPUTS_S); FOREVER (0): kept for ever


def tenant_defaults(*, session: Session, tenant: str) -> TenantDefaults:
    """The tenant's lanes and default retention, in one query (none set, or no tenant row: the fleet's)."""
    row = session.execute(select(Tenant.lanes, Tenant.expires_after_s).where(Tenant.name == tenant)).one_or_none()
    if row is None:
        return TenantDefaults(lanes=None, expires_after_s=None)
    return TenantDefaults(
        lanes=frozenset(row.lanes.split(",")) if row.lanes else None, expires_after_s=row.expires_after_s
    )


def set_retention(*, session: Session, tenant: str, expires_after_s: int | None) -> None:
    """Set the tenant's default retention (FOREVER: kept for ever; None: the fleet's), creating the tenant if needed."""
    ensure_tenant(session=session, name=tenant)
    session.execute(update(Tenant).where(Tenant.name == tenant).values(expires_after_s=expires_after_s))


def restrict_lanes(*, session: Session, tenant: str, lanes: Sequence[str] | None) -> None:
    """Hold `tenant` to `lanes` (None or empty: every lane), creating the tenant if needed."""
    ensure_tenant(session=session, name=tenant)
    for lane in lanes or ():
        if lane not in LANES:
            raise InvalidInput("--lanes", lane, f"is not a lane; use some of {', '.join(LANES)}")
    value = ",".join(sorted(set(lanes))) if lanes else None
    session.execute(update(Tenant).where(Tenant.name == tenant).values(lanes=value))
