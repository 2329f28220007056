"""`ipab export BATCH --format imagefolder|webdataset|parquet --out DIR|s3://bucket/prefix`."""

from __future__ import annotations

import argparse
from typing import Any

from scheduler.cli.common import database, read_batch
from scheduler.export.formats import FORMATS


def cmd_export(args: argparse.Namespace) -> int:
    """Export the batch's succeeded jobs that the output does not hold yet; a summary line on stdout."""
    from scheduler.export.run import export_batch
    from scheduler.export.writer import parse_size_bytes
    from scheduler.terminal_progress import Reporter
    from shared.settings import load_settings
    from shared.storage import ObjectStore

    shard_size_bytes = parse_size_bytes(args.shard_size)
    settings = load_settings()
    store = ObjectStore.from_settings(settings)
    with database(settings) as sessions:
        batch = read_batch(sessions, args.batch)
        report = export_batch(
            sessions=sessions,
            store=store,
            batch=batch,
            format_name=args.format,
            out=args.out,
            include_failed=args.include_failed,
            shard_size_bytes=shard_size_bytes,
            progress=Reporter(),
        )
    failed = "" if report.failed is None else f"; {report.failed} failed job(s) listed in errors.jsonl"
    if report.removed:
        failed += f"; {report.removed} job(s) skipped: their images were removed (expired or deleted)"
    print(f"exported {report.added} new job(s) to {report.where} as {args.format} ({report.total} in all){failed}")
    return 0


def register(subparsers: Any) -> None:
    """Add `export`."""
    export = subparsers.add_parser("export", help="a batch's images and metadata as a dataset")
    export.add_argument("batch", help="batch name or id")
    export.add_argument("--format", required=True, choices=FORMATS, help="imagefolder, webdataset or parquet")
    export.add_argument("--out", required=True, help="a folder, or s3://bucket/prefix on the configured store")
    export.add_argument("--include-failed", action="store_true", help="also write errors.jsonl (the failed jobs)")
    export.add_argument("--shard-size", default="1GB", help="webdataset/parquet file size, e.g. 500MB (default 1GB)")
    export.set_defaults(func=cmd_export)
