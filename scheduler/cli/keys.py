"""`ipab keys create|list|revoke`: API keys of tenants (the key is printed once; only its hash is kept)."""

from __future__ import annotations

import argparse
from typing import Any

from scheduler.cli.common import database
from shared.errors import InvalidInput


def _when(value: Any) -> str:
    return "" if value is None else value.isoformat() + "Z"


def cmd_keys_create(args: argparse.Namespace) -> int:
    """Create a key (and the tenant, with its webhook secret, if new); the key alone on the last line."""
    from scheduler.tenants import create_key, restrict_lanes
    from shared.jobs import transaction
    from shared.settings import load_settings

    with database(load_settings()) as sessions, transaction(sessions) as session:
        new = create_key(session=session, tenant=args.tenant, admin=args.admin)
        if args.lanes is not None:
            restrict_lanes(
                session=session, tenant=args.tenant, lanes=[x.strip() for x in args.lanes.split(",") if x.strip()]
            )
    kind = "admin key" if new.admin else "key"
    print(f"created {kind} {new.key_id} for tenant {new.tenant}; it is shown once, store it now")
    if new.webhook_secret is not None:
        print(f"webhook signing secret of tenant {new.tenant} (shown once): {new.webhook_secret}")
    print(new.key)
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    """Every key: id, tenant, admin, created, revoked (never the key)."""
    from scheduler.tenants import list_keys
    from shared.jobs import transaction
    from shared.settings import load_settings

    with database(load_settings()) as sessions, transaction(sessions) as session:
        keys = list_keys(session=session)
        print("\t".join(["id", "tenant", "admin", "created_at", "revoked_at"]))
        for key in keys:
            cells = [key.id, key.tenant, "yes" if key.admin else "no", _when(key.created_at), _when(key.revoked_at)]
            print("\t".join(cells))
    return 0


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Revoke a key by id; it stops working at once."""
    from scheduler.tenants import revoke_key
    from shared.jobs import transaction
    from shared.settings import load_settings

    with database(load_settings()) as sessions, transaction(sessions) as session:
        if not revoke_key(session=session, key_id=args.key_id):
            raise InvalidInput("ID", args.key_id, "no unrevoked key has this id; `ipab keys list` shows them")
    print(f"revoked {args.key_id}")
    return 0


def register(subparsers: Any) -> None:
    """Add `ipab keys`."""
    keys = subparsers.add_parser("keys", help="API keys of tenants")
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="ACTION")
    create = sub.add_parser("create", help="a new key for a tenant (printed once, alone on the last line)")
    create.add_argument("--tenant", required=True, help="tenant name (created with its webhook secret if new)")
    create.add_argument("--admin", action="store_true", help="an admin key")
    create.add_argument(
        "--lanes", metavar="LANE,...", help="hold the tenant to these lanes (interactive, scheduled, bulk); '' lifts it"
    )
    create.set_defaults(func=cmd_keys_create)
    sub.add_parser("list", help="every key (ids, never the keys)").set_defaults(func=cmd_keys_list)
    revoke = sub.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("key_id", metavar="ID", help="the key's id (from `ipab keys list`)")
    revoke.set_defaults(func=cmd_keys_revoke)
