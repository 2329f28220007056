"""`ipab cache stats`: the embedding cache's fleet-wide counters (hits and misses per level, encodes).

No torch here: the command reads a Redis hash only.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def register(subparsers: Any) -> None:
    """Add `ipab cache stats`."""
    cache: argparse.ArgumentParser = subparsers.add_parser("cache", help="the embedding cache")
    commands = cache.add_subparsers(dest="cache_command", required=True, metavar="COMMAND")
    stats = commands.add_parser("stats", help="fleet-wide hits and misses per level, encodes and encode seconds")
    stats.add_argument("--json", action="store_true", help="print a JSON object instead of a table")
    stats.set_defaults(func=_stats)


def _stats(args: argparse.Namespace) -> int:
    import redis

    from shared.cache_stats import format_stats_table, read_fleet_stats
    from shared.redis_conn import connect_redis, redis_unreachable
    from shared.settings import load_settings

    settings = load_settings()
    client = connect_redis(settings.redis_url)
    try:
        counters = read_fleet_stats(client, settings.redis_prefix)
    except redis.RedisError as e:
        raise redis_unreachable(settings.redis_url, e) from e
    finally:
        client.close()
    print(json.dumps(counters, sort_keys=True) if args.json else format_stats_table(counters))
    return 0
