"""`python -m devkit demo|up|synth|docker-check`: the development commands (run from the repository root)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from devkit import demo, docker_check, up
from shared.errors import IpabError


def cmd_synth(args: argparse.Namespace) -> int:
    """Write the tiny model set and list its model-set files."""
    from devkit.synth import write_tiny_model_set

    paths = write_tiny_model_set(args.dir, seed=args.seed)
    print(f"wrote a tiny random-weight model set (images are noise) to {args.dir}")
    for key, path in sorted(paths.items()):
        print(f"  {key}: {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """`demo`, `up`, `synth` and `docker-check`."""
    parser = argparse.ArgumentParser(prog="python -m devkit", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo.register(sub)
    up.register(sub)
    docker_check.register(sub)
    synth = sub.add_parser("synth", help="write a tiny random-weight model set (its images are noise)")
    synth.add_argument("dir", type=Path)
    synth.add_argument("--seed", type=int, default=0, help="same seed, same bytes")
    synth.set_defaults(func=cmd_synth)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one development command; returns the exit status."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("botocore", "boto3", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        code: int = args.func(args)
    except IpabError as e:
        print(f"devkit: error: {e}", file=sys.stderr)
        return 2
    return code


if __name__ == "__main__":
    sys.exit(main())
