"""The `ipab` command line: one parser; each part of the system registers its own commands.

Command modules must not import torch at import time: `ipab submit` stays light.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from shared.errors import IpabError

# Each module defines `register(subparsers)`, adding parsers whose `func` takes the args.
COMMAND_MODULES = (
    "scheduler.commands",
    "worker.commands",
    "worker.serve",
    "scheduler.ops_commands",
    "scheduler.demo",
    "worker.embed_cache_cli",
)


def build_parser() -> argparse.ArgumentParser:
    """The full `ipab` parser with every command registered."""
    parser = argparse.ArgumentParser(prog="ipab", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at debug level")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `ipab` console script; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        code: int = args.func(args)
    except IpabError as e:
        print(f"ipab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
